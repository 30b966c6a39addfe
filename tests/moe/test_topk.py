"""Top-k router: selection, Switch/GShard weights, balance and z losses (routers.md §1, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.losses import router_z_loss, slot_counts, switch_balance_loss
from moe.routers.topk import TopKConfig, TopKRouter


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_exactly_k_distinct_experts_per_token(k: int) -> None:
    router = TopKRouter(TopKConfig(k=k), d_model=16, num_experts=8)
    d = router(torch.randn(50, 16), RouterContext())
    assert d.expert_ids_TK.shape == (50, k)
    assert all(len(set(row.tolist())) == k for row in d.expert_ids_TK)
    assert ((d.weights_TK > 0).sum(dim=1) == k).all()


@pytest.mark.parametrize("k", [2, 4])
def test_weights_sum_to_one_and_follow_softmax_order(k: int) -> None:
    router = TopKRouter(TopKConfig(k=k), d_model=16, num_experts=8)
    x = torch.randn(40, 16)
    d = router(x, RouterContext())
    torch.testing.assert_close(d.weights_TK.sum(dim=1), torch.ones(40))
    # Renormalised top-k of the full softmax == softmax over the selected logits (GShard form).
    logits = x @ router.gate.weight.t()
    expected = torch.softmax(logits.gather(1, d.expert_ids_TK), dim=1)
    torch.testing.assert_close(d.weights_TK, expected)
    assert (logits.gather(1, d.expert_ids_TK[:, :1]) >= logits.max(dim=1, keepdim=True).values - 1e-6).all()


def test_switch_k1_weight_is_softmax_probability_and_gets_gradient() -> None:
    router = TopKRouter(TopKConfig(k=1, aux_loss_coef=0, z_loss_coef=0), d_model=16, num_experts=8)
    x = torch.randn(30, 16)
    d = router(x, RouterContext())
    probs = torch.softmax(x @ router.gate.weight.t(), dim=1)
    torch.testing.assert_close(d.weights_TK[:, 0], probs.max(dim=1).values)
    assert (d.weights_TK < 1).all()
    d.weights_TK.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_balance_loss_uniform_equals_one_times_coefficient() -> None:
    T, E, K = 64, 8, 2
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)  # every expert 16 slots
    assert ids.shape == (T, K)
    assert switch_balance_loss(probs, ids).item() == pytest.approx(1.0)
    router = TopKRouter(TopKConfig(k=1, aux_loss_coef=0.01), d_model=4, num_experts=E)
    with torch.no_grad():
        router.gate.weight.zero_()  # uniform probabilities; top-1 ties go to expert 0
    d = router(torch.randn(T, 4), RouterContext())
    # All tokens on expert 0 with P_0 = 1/E: loss = coef * E * (1 * 1/E) = coef.
    assert d.aux_losses["aux_loss"].item() == pytest.approx(0.01)


def test_balance_loss_collapsed_equals_coefficient_times_E() -> None:
    T, E = 32, 8
    probs = torch.zeros(T, E)
    probs[:, 3] = 1.0
    ids = torch.full((T, 1), 3)
    assert switch_balance_loss(probs, ids).item() == pytest.approx(E)
    router = TopKRouter(TopKConfig(k=1, aux_loss_coef=0.01), d_model=4, num_experts=E)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[3] = 100.0
    d = router(torch.ones(T, 4), RouterContext())
    assert d.aux_losses["aux_loss"].item() == pytest.approx(0.01 * E, rel=1e-5)


def test_z_loss_matches_formula() -> None:
    logits = torch.randn(10, 6)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_jitter_only_in_training() -> None:
    router = TopKRouter(TopKConfig(k=2, jitter=0.2), d_model=16, num_experts=8)
    x = torch.randn(20, 16)
    router.eval()
    torch.testing.assert_close(router.logits(x), x @ router.gate.weight.t())
    router.train()
    assert not torch.allclose(router.logits(x), x @ router.gate.weight.t())


@pytest.mark.parametrize("kwargs,key", [({"k": 0}, "router.k"), ({"jitter": 1.5}, "router.jitter"), ({"aux_loss_coef": -1.0}, "router.aux_loss_coef")])
def test_bad_config_names_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TopKConfig(**kwargs)


def test_k_above_num_experts_refused() -> None:
    with pytest.raises(ConfigError, match=r"router\.k \(9\) must be <= model\.num_experts \(8\)"):
        TopKRouter(TopKConfig(k=9), d_model=4, num_experts=8)


@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_from_given_counts_equals_counting_inside(masked: bool) -> None:
    """``switch_balance_loss(..., counts_E=slot_counts(...))`` is the same bits as the loss counting
    for itself, value and gradient, on fresh random routing (with and without a slot mask)."""
    g = torch.Generator().manual_seed(5)
    T, E, K = 77, 9, 3
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    probs = torch.softmax(logits, dim=-1)
    ids = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    mask = torch.rand(T, K, generator=g) > 0.4 if masked else None
    counts = slot_counts(ids, E, mask)
    want = (ids[mask] if masked else ids.reshape(-1)).bincount(minlength=E)
    assert counts.dtype == torch.int64 and torch.equal(counts, want)
    given, inside = switch_balance_loss(probs, ids, mask, counts_E=counts), switch_balance_loss(probs, ids, mask)
    assert torch.equal(given, inside)
    assert torch.equal(*(torch.autograd.grad(v, logits, retain_graph=True)[0] for v in (given, inside)))
