"""Dropless/capacity dispatch and both expert backends against a naive per-token reference."""

from __future__ import annotations

import pytest
import torch

from moe.dispatch import capacity, dispatch
from moe.experts import Experts, ExpertsConfig
from moe.layer import MoELayer, local_runner
from moe.routers import RouterContext, RoutingDecision
from moe.routers.topk import TopKConfig

from tests.moe.reference import naive_moe


def random_decision(T: int, E: int, K: int, idle: set[int], generator: torch.Generator, dtype: torch.dtype) -> RoutingDecision:
    """Random distinct experts per token, never choosing the experts in ``idle``."""
    allowed = torch.tensor([e for e in range(E) if e not in idle])
    scores = torch.rand(T, len(allowed), generator=generator)
    ids = allowed[scores.topk(K, dim=1).indices]
    weights = torch.rand(T, K, generator=generator, dtype=dtype) + 0.1
    return RoutingDecision(expert_ids_TK=ids, weights_TK=weights, probs_TE=torch.full((T, E), 1.0 / E))


def run_layer_path(backend: str, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    T, D, F, E, K = 37, 16, 24, 6, 2
    experts = Experts(E, D, F, backend=backend).to(dtype)
    x = torch.randn(T, D, dtype=dtype, generator=g, requires_grad=True)
    decision = random_decision(T, E, K, idle={1, 4}, generator=g, dtype=dtype)
    weights = decision.weights_TK.requires_grad_()
    decision = RoutingDecision(expert_ids_TK=decision.expert_ids_TK, weights_TK=weights, probs_TE=decision.probs_TE)
    plan = dispatch(decision, E)
    assert plan.counts_E[1] == 0 and plan.counts_E[4] == 0
    y = local_runner(experts, x, plan)
    params = [x, weights, experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD]
    grad_out = torch.randn(y.shape, dtype=dtype, generator=g)
    grads = torch.autograd.grad(y, params, grad_out)

    ref_params = [p.detach().clone().requires_grad_() for p in params]
    y_ref = naive_moe(ref_params[0], decision.expert_ids_TK, ref_params[1], None, *ref_params[2:])
    ref_grads = torch.autograd.grad(y_ref, ref_params, grad_out)
    tol = {"atol": 1e-10, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)
    # Idle experts get exactly zero gradient.
    assert grads[2][1].abs().max() == 0 and grads[4][4].abs().max() == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_backend_matches_naive_fp64(seed: int) -> None:
    run_layer_path("torch", torch.float64, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_mm_backend_matches_naive_fp32(seed: int) -> None:
    run_layer_path("grouped_mm", torch.float32, seed)


def test_backends_agree_on_full_layer() -> None:
    torch.manual_seed(3)
    cfg_t, cfg_g = ExpertsConfig(backend="torch"), ExpertsConfig(backend="grouped_mm")
    a = MoELayer(16, 32, 8, TopKConfig(k=2), cfg_t, num_shared_experts=1)
    b = MoELayer(16, 32, 8, TopKConfig(k=2), cfg_g, num_shared_experts=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(50, 16)
    ya, auxa = a(x, RouterContext())
    yb, auxb = b(x, RouterContext())
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(ya.square().sum() + sum(auxa.values()), list(a.parameters()))
    gb = torch.autograd.grad(yb.square().sum() + sum(auxb.values()), list(b.parameters()))
    for p, u, v in zip(a.parameters(), ga, gb):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_plan_is_stable_sort_by_expert() -> None:
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    d = RoutingDecision(expert_ids_TK=ids, weights_TK=torch.ones(4, 2), probs_TE=torch.full((4, 3), 1 / 3))
    plan = dispatch(d, 3)
    # slots token-major: t*2+j. Expert 0: slots 1, 2, 6; expert 1: 3, 5; expert 2: 0, 4, 7.
    assert plan.slot_idx_R.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]
    assert plan.counts_E.tolist() == [3, 2, 3]
    assert plan.offsets_E1.tolist() == [0, 3, 5, 8]
    assert plan.token_idx_R.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]


def test_masked_slots_are_skipped_not_dropped() -> None:
    ids = torch.tensor([[0, 1, 2], [1, 2, 0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    d = RoutingDecision(expert_ids_TK=ids, weights_TK=torch.ones(2, 3), probs_TE=torch.full((2, 3), 1 / 3), mask_TK=mask)
    plan = dispatch(d, 3)
    assert plan.counts_E.tolist() == [2, 0, 1]
    assert plan.num_rows == 3 and int(plan.num_routed) == 3 and int(plan.num_dropped) == 0


def test_capacity_drops_exactly_the_overflow_in_priority_order() -> None:
    # 6 tokens, k=2, E=3, cf=0.5: C = ceil(2*6*0.5/3) = 2 slots per expert.
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [1, 2]])
    d = RoutingDecision(expert_ids_TK=ids, weights_TK=torch.ones(6, 2), probs_TE=torch.full((6, 3), 1 / 3))
    assert capacity(6, 2, 3, 0.5) == 2
    plan = dispatch(d, 3, capacity_factor=0.5)
    # First choices (tokens in order) fill first: expert 0 <- t0, t1 (t2's first choice dropped);
    # expert 1 <- t3, t5; expert 2 <- t4. Second choices: only expert 2 has room: t1 (slot 3).
    kept = sorted(plan.slot_idx_R.tolist())
    assert kept == [0, 2, 3, 6, 8, 10]
    assert plan.counts_E.tolist() == [2, 2, 2]
    assert int(plan.num_routed) == 12 and int(plan.num_dropped) == 6


def test_capacity_layer_reports_dropped_fraction() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, TopKConfig(k=2), ExpertsConfig(backend="torch", capacity_factor=0.5))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 5.0
        layer.router.gate.weight[1] = 4.0
    x = torch.rand(40, 8) + 0.5  # every token prefers experts 0 then 1
    layer(x, RouterContext())
    stats = layer.stats.summarize(*layer.stats.raw())
    cap = capacity(40, 2, 4, 0.5)  # 10
    assert stats["tokens_per_expert"] == [cap, cap, 0, 0]
    assert stats["dropped_frac"] == pytest.approx((80 - 2 * cap) / 80)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropless_dispatch_takes_the_routers_counts_and_they_equal_a_recount(seed: int) -> None:
    """Top-k routing counts its slots once (balance loss); dropless dispatch reuses them. The plan
    is the same bits as one dispatch counted itself, and the counts are the true loads."""
    g = torch.Generator().manual_seed(seed)
    T, D, E, K = 53, 8, 7, 3
    router = MoELayer(D, 12, E, TopKConfig(k=K), ExpertsConfig(backend="torch")).router
    decision = router(torch.randn(T, D, generator=g), RouterContext())
    assert decision.counts_E is not None
    counted = RoutingDecision(expert_ids_TK=decision.expert_ids_TK, weights_TK=decision.weights_TK, probs_TE=decision.probs_TE)
    reused, recounted = dispatch(decision, E), dispatch(counted, E)
    assert reused.counts_E is decision.counts_E
    assert torch.equal(reused.counts_E, torch.bincount(decision.expert_ids_TK.reshape(-1), minlength=E))
    for name in ("slot_idx_R", "token_idx_R", "weight_R", "counts_E", "row_of_slot_A"):
        assert torch.equal(getattr(reused, name), getattr(recounted, name)), name
    capped = dispatch(decision, E, capacity_factor=0.5)  # capacity mode counts the kept slots itself
    assert capped.counts_E is not decision.counts_E and int(capped.counts_E.sum()) < T * K


@pytest.mark.parametrize("masked", [False, True])
def test_weight_gradient_into_slots_is_the_inverse_permutation(masked: bool) -> None:
    """``weight_R``'s backward: a gather through ``row_of_slot_A`` when every slot has a row, a
    scatter into zeros otherwise; both equal autograd through plain indexing on fresh inputs."""
    g = torch.Generator().manual_seed(3)
    T, E, K = 41, 5, 2
    decision = random_decision(T, E, K, idle=set(), generator=g, dtype=torch.float32)
    mask = torch.rand(T, K, generator=g) > 0.3 if masked else None
    weights = decision.weights_TK.clone().requires_grad_()
    plan = dispatch(RoutingDecision(expert_ids_TK=decision.expert_ids_TK, weights_TK=weights, probs_TE=decision.probs_TE, mask_TK=mask), E)
    grad_R = torch.randn(plan.num_rows, generator=g)
    (got,) = torch.autograd.grad(plan.weight_R, weights, grad_R)
    plain = weights.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(plain.reshape(-1)[plan.slot_idx_R], plain, grad_R)
    assert torch.equal(got, want)
    if masked:
        assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
