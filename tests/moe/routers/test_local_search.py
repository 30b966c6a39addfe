"""Permutation local search (COMET+): Sinkhorn, Hungarian freeze as a checkpointable event, topk wrap."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.local_search import (
    LocalSearchConfig,
    PermutationLocalSearch,
    hungarian,
    permutation_entropy,
    sinkhorn,
)
from moe.routers.topk import TopKConfig, TopKRouter, topk_decision
from tests.moe.routers.naive_layer import check_layer_matches_naive


def _ls(E: int = 5, slots: int = 1, **kw: object) -> PermutationLocalSearch:
    cfg = LocalSearchConfig(enabled=True, **{"window_steps": 4, **kw})  # type: ignore[arg-type]
    return PermutationLocalSearch(cfg, num_experts=E, num_slots=slots)


def test_sinkhorn_is_doubly_stochastic_at_moderate_tau() -> None:
    torch.manual_seed(0)
    log_alpha = torch.randn(3, 6, 6, dtype=torch.float64) / 0.5  # tau = 0.5
    P = sinkhorn(log_alpha, 100)
    ones = torch.ones(3, 6, dtype=torch.float64)
    torch.testing.assert_close(P.sum(dim=-2), ones)
    torch.testing.assert_close(P.sum(dim=-1), ones)
    assert (P > 0).all()


def test_hungarian_is_the_best_permutation_by_brute_force() -> None:
    torch.manual_seed(1)
    P = torch.rand(2, 5, 5)
    perm = hungarian(P)
    for p in range(2):
        assert sorted(perm[p].tolist()) == list(range(5))
        best = max(itertools.permutations(range(5)), key=lambda s: sum(float(P[p, j, s[j]]) for j in range(5)))
        assert perm[p].tolist() == list(best)


def test_schedule_endpoints_log_linear_tau_and_linear_iters() -> None:
    ls = _ls(window_steps=11, tau_start=1e-3, tau_end=1e-7, iters_start=20, iters_end=150)
    assert ls.schedule(0) == (pytest.approx(1e-3), 20)
    assert ls.schedule(5) == (pytest.approx(1e-5), 85)
    assert ls.schedule(10) == (pytest.approx(1e-7), 150)
    assert ls.schedule(500) == (pytest.approx(1e-7), 150)


def test_permutation_entropy_of_hard_and_uniform() -> None:
    eye = torch.eye(4).unsqueeze(0)
    assert permutation_entropy(eye).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 4, 4), 0.25)
    # Each of the 16 entries contributes -1/4 ln 1/4, for P and for its row normalisation.
    assert permutation_entropy(uniform).item() == pytest.approx(2 * 4 * math.log(4), rel=1e-6)


def test_freeze_once_at_window_end_and_survive_state_dict_round_trip() -> None:
    torch.manual_seed(2)
    ls = _ls(E=6, slots=2, per_tree=True, window_steps=4, tau_start=1.0, tau_end=0.05)
    ls.after_step(1)
    assert not bool(ls.frozen) and ls.perm_PE.tolist() == [list(range(6))] * 2
    with torch.no_grad():
        ls.log_weights_PEE.copy_(torch.stack([torch.eye(6).roll(1, dims=1), torch.eye(6).roll(2, dims=1)]) * 0.5)
    ls.after_step(3)  # window_steps - 1: the freeze
    assert bool(ls.frozen)
    expected = [[(j + 1) % 6 for j in range(6)], [(j + 2) % 6 for j in range(6)]]
    assert ls.perm_PE.tolist() == expected

    resumed = _ls(E=6, slots=2, per_tree=True, window_steps=4, tau_start=1.0, tau_end=0.05)
    assert not resumed.is_frozen()  # the fresh module has read its (False) flag once
    resumed.load_state_dict(ls.state_dict())
    assert resumed.is_frozen() and resumed.perm_PE.tolist() == expected
    with torch.no_grad():  # the learned weights now point elsewhere: a re-freeze would change perm
        resumed.log_weights_PEE.copy_(torch.eye(6).expand(2, 6, 6))
    resumed.after_step(3)
    resumed.after_step(100)
    assert resumed.perm_PE.tolist() == expected


def test_mix_soft_keeps_mass_and_hard_is_exact_gather() -> None:
    torch.manual_seed(3)
    ls = _ls(E=5, slots=2, tau_start=1e-3, tau_end=1e-3, iters_start=3, iters_end=3)
    dist = torch.softmax(torch.randn(7, 10), dim=-1).view(7, 2, 5)
    g, aux = ls.mix(dist, step=0)
    torch.testing.assert_close(g.sum(dim=-1), torch.ones(7))  # rows of P are not normalised at this tau
    assert aux["perm_entropy"].requires_grad
    ls.after_step(3)
    g_hard, aux_hard = ls.mix(dist, step=4)
    assert aux_hard == {}
    perm = ls.perm_PE[0]
    expected = torch.zeros(7, 5)
    for j in range(5):
        expected[:, perm[j]] = dist[:, 0, j] + dist[:, 1, j]
    assert torch.equal(g_hard, expected)


def test_eval_before_freeze_uses_hungarian_of_current_soft() -> None:
    torch.manual_seed(4)
    ls = _ls(E=4, tau_start=1.0, tau_end=1.0).eval()
    with torch.no_grad():
        ls.log_weights_PEE.copy_(torch.eye(4)[[2, 0, 3, 1]].unsqueeze(0))
    dist = torch.softmax(torch.randn(3, 4), dim=-1).unsqueeze(1)
    g, aux = ls.mix(dist, step=0)
    assert aux == {} and not bool(ls.frozen)
    torch.testing.assert_close(g[:, [2, 0, 3, 1]], dist[:, 0])


def test_topk_disabled_is_unchanged() -> None:
    torch.manual_seed(5)
    router = TopKRouter(TopKConfig(k=2), d_model=16, num_experts=8)
    assert list(router.state_dict()) == ["gate.weight"]
    x = torch.randn(20, 16)
    d = router(x, RouterContext())
    logits = x @ router.gate.weight.t()
    ref = topk_decision(logits, torch.softmax(logits, dim=-1), 2, 0.01, 0.001)
    assert torch.equal(d.expert_ids_TK, ref.expert_ids_TK) and torch.equal(d.weights_TK, ref.weights_TK)
    assert sorted(d.aux_losses) == ["aux_loss", "z_loss"]


def test_topk_with_local_search_window_then_frozen_remap() -> None:
    torch.manual_seed(6)
    ls = LocalSearchConfig(enabled=True, window_steps=2, tau_start=1.0, tau_end=0.1)
    router = TopKRouter(TopKConfig(k=2, local_search=ls), d_model=16, num_experts=8)
    x = torch.randn(20, 16)
    d = router(x, RouterContext(step=0))
    assert "perm_entropy" in d.aux_losses
    sum(d.aux_losses.values()).add(d.weights_TK.sum()).backward()
    assert router.local_search.log_weights_PEE.grad.abs().sum() > 0
    router.after_step(1, experts=torch.nn.Module())
    perm = router.local_search.perm_PE[0]
    base = topk_decision(x @ router.gate.weight.t(), torch.softmax(x @ router.gate.weight.t(), dim=-1), 2, 0.01, 0.001)
    router.local_search.log_weights_PEE.grad = None
    d = router(x, RouterContext(step=5))
    assert torch.equal(d.expert_ids_TK, perm[base.expert_ids_TK])  # ids remapped by the frozen permutation
    torch.testing.assert_close(d.weights_TK, base.weights_TK)
    sum(d.aux_losses.values()).add(d.weights_TK.sum()).backward()
    assert router.local_search.log_weights_PEE.grad is None  # stop-grad after the freeze


def test_topk_layer_with_local_search_matches_naive_loop() -> None:
    ls = LocalSearchConfig(enabled=True, window_steps=5, tau_start=0.5, tau_end=0.1)
    check_layer_matches_naive(TopKConfig(k=2, local_search=ls), RouterContext(batch_size=2, seq_len=4, step=1))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="router.local_search.window_steps"):
        LocalSearchConfig(window_steps=0)
    with pytest.raises(ConfigError, match="router.local_search.tau_end"):
        LocalSearchConfig(tau_end=0.0)
