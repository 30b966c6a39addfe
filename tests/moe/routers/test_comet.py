"""COMET tree gate: smooth step, heap-layout trees, sparsity once splits saturate (routers.md §4)."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import ROUTERS, RouterContext
from moe.routers.comet import CometConfig, CometRouter, leaf_paths, leaf_probs
from moe.routers.local_search import LocalSearchConfig
from moe.routers.smooth_gates import smooth_step
from tests.moe.routers.naive_layer import check_layer_matches_naive


def _router(E: int = 8, k: int = 2, d: int = 16, **kw: object) -> CometRouter:
    return CometRouter(CometConfig(k=k, **kw), d_model=d, num_experts=E)


def _nnz(g_TE: torch.Tensor) -> torch.Tensor:
    return (g_TE > 0).sum(dim=-1)


def _g(router: CometRouter, x_TD: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Dense per-expert weights from the decision's sorted slots."""
    d = router(x_TD, RouterContext(step=step))
    return torch.zeros_like(d.probs_TE).scatter(1, d.expert_ids_TK, d.weights_TK * d.valid_mask())


@pytest.mark.parametrize("gamma", [0.01, 1.0, 10.0])
def test_smooth_step_values_and_derivatives(gamma: float) -> None:
    t = torch.tensor([-gamma / 2, 0.0, gamma / 2, -gamma, 3 * gamma], dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, gamma)
    assert s.tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]
    (grad,) = torch.autograd.grad(s.sum(), t)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.5 / gamma, 0.0, 0.0, 0.0], dtype=torch.float64))
    # Far outside the band the gradient is exactly 0, not 0 * inf = NaN from the unused cubic.
    far = torch.tensor([-1e20, 1e20], requires_grad=True)
    (g_far,) = torch.autograd.grad(smooth_step(far, gamma).sum(), far)
    assert g_far.tolist() == [0.0, 0.0]
    # C^1 at the band edges: S'(gamma/2 - delta) = 6 delta (gamma - delta) / gamma^3 -> 0.
    delta = gamma * 1e-3
    t_in = torch.tensor([gamma / 2 - delta, -gamma / 2 + delta], dtype=torch.float64, requires_grad=True)
    (g_in,) = torch.autograd.grad(smooth_step(t_in, gamma).sum(), t_in)
    expected = 6 * delta * (gamma - delta) / gamma**3
    torch.testing.assert_close(g_in, torch.tensor([expected, expected], dtype=torch.float64))


def test_leaf_layout_non_power_of_two() -> None:
    node_EL, left_EL, valid_EL = leaf_paths(6)
    # Heap with 5 internal nodes: leaves 7,8,9,10 (depth 3) then 5,6 (depth 2), left to right.
    assert valid_EL.sum(dim=1).tolist() == [3, 3, 3, 3, 2, 2]
    assert node_EL[0].tolist() == [0, 1, 3] and left_EL[0].tolist() == [True, True, True]
    assert node_EL[5, :2].tolist() == [0, 2] and left_EL[5, :2].tolist() == [False, False]


def _reference_leaf_probs(s_N: list[float], E: int) -> list[float]:
    """Walk the heap recursively, appending leaves left to right."""
    out: list[float] = []

    def walk(node: int, prob: float) -> None:
        if node >= E - 1:
            out.append(prob)
            return
        walk(2 * node + 1, prob * s_N[node])
        walk(2 * node + 2, prob * (1 - s_N[node]))

    walk(0, 1.0)
    return out


@pytest.mark.parametrize("E", [2, 3, 5, 6, 8, 11])
def test_leaf_probs_match_recursive_reference_and_sum_to_one(E: int) -> None:
    torch.manual_seed(E)
    s_TKN = torch.rand(4, 3, E - 1, dtype=torch.float64)
    p_TKE = leaf_probs(s_TKN, *leaf_paths(E))
    torch.testing.assert_close(p_TKE.sum(dim=-1), torch.ones(4, 3, dtype=torch.float64))
    for t in range(4):
        for tree in range(3):
            expected = _reference_leaf_probs(s_TKN[t, tree].tolist(), E)
            torch.testing.assert_close(p_TKE[t, tree], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("E", [6, 8])
def test_dense_at_init_and_matches_closed_form(E: int) -> None:
    torch.manual_seed(0)
    router = _router(E=E, k=2)
    x = torch.randn(32, 16)
    g = _g(router, x)
    assert (_nnz(g) == E).all()
    torch.testing.assert_close(g.sum(dim=-1), torch.ones(32))
    p = router.tree_probs(x)
    a = router.leaf_logits(x)
    # Splits start near 1/2: with gamma/100 weights every path probability is close to 2^-depth.
    assert p.min() > 0.5 * 2 ** -math.ceil(math.log2(E))
    # With P = I and no leaf below the floor, g_e is proportional to sum_t p_te exp(a_te).
    w = (p * a.exp()).sum(dim=1)
    torch.testing.assert_close(g, w / w.sum(dim=-1, keepdim=True))


def test_saturated_splits_use_at_most_k_experts() -> None:
    torch.manual_seed(1)
    E, k, gamma, trials = 8, 2, 1.0, 200
    router = _router(E=E, k=k, gamma=gamma)
    torch.nn.init.normal_(router.leaf.weight, std=1.0)  # distinct leaf logits per token
    sign = torch.randint(0, 2, (trials, k, E - 1)) * 2 - 1
    pre = sign * (gamma / 2 + torch.rand(trials, k, E - 1) * 2)  # |pre| >= gamma/2
    router.split_preactivations = lambda x_TD: pre  # type: ignore[method-assign]
    d = router(torch.randn(trials, 16), RouterContext())
    g = torch.zeros(trials, E).scatter(1, d.expert_ids_TK, d.weights_TK)
    nnz = _nnz(g)
    assert torch.equal(d.valid_mask().sum(dim=1), nnz)  # what dispatch runs
    assert nnz.max() <= k and nnz.min() >= 1
    assert (nnz == k).sum() > trials // 2  # two random trees usually pick different experts
    torch.testing.assert_close(g.sum(dim=-1), torch.ones(trials))


def test_one_split_inside_the_band_gives_k_plus_one_experts() -> None:
    E, gamma = 8, 1.0
    router = _router(E=E, k=2, gamma=gamma)
    pre = torch.empty(1, 2, E - 1)
    pre[0, 0] = -gamma  # tree 0: always right ...
    pre[0, 0, 0] = 0.0  # ... except a root split at 1/2 -> leaves 3 and 7
    pre[0, 1] = gamma  # tree 1: always left -> leaf 0
    router.split_preactivations = lambda x_TD: pre  # type: ignore[method-assign]
    g = _g(router, torch.randn(1, 16))
    assert torch.nonzero(g[0]).flatten().tolist() == [0, 3, 7]


def test_leaves_below_the_probability_floor_get_exactly_zero_weight() -> None:
    router = _router(E=4, k=1)
    p = torch.tensor([[[0.5, 0.5 - 3e-5, 2e-5, 1e-5 - 1e-6]]])  # the last leaf is below 1e-5
    router.tree_probs = lambda x_TD: p  # type: ignore[method-assign]
    d = router(torch.randn(1, 16), RouterContext())
    g = torch.zeros(1, 4).scatter(1, d.expert_ids_TK, d.weights_TK)
    assert g[0, 3] == 0 and (g[0, :3] > 0).all()
    assert d.valid_mask().sum().item() == 3


def test_entropy_regulariser_value() -> None:
    torch.manual_seed(2)
    router = _router(E=6, k=3, entropy_coef=0.5)
    x = torch.randn(10, 16)
    d = router(x, RouterContext())
    p = router.tree_probs(x).detach()
    expected = 0.5 * sum(float(-(p[:, t] * p[:, t].log()).sum(dim=-1).mean()) for t in range(3))
    assert d.aux_losses["comet_entropy"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("per_tree", [False, True])
def test_permutation_keeps_sum_and_remaps_experts(per_tree: bool) -> None:
    torch.manual_seed(3)
    ls = LocalSearchConfig(enabled=True, window_steps=3, tau_start=1.0, tau_end=0.1, per_tree=per_tree)
    router = _router(E=8, k=2, local_search=ls)
    x = torch.randn(12, 16)
    g_soft = _g(router, x, step=0)
    torch.testing.assert_close(g_soft.sum(dim=-1), torch.ones(12))
    assert "perm_entropy" in router(x, RouterContext(step=0)).aux_losses
    router.after_step(2, experts=torch.nn.Module())
    assert bool(router.local_search.frozen)
    g_hard = _g(router, x, step=5)
    torch.testing.assert_close(g_hard.sum(dim=-1), torch.ones(12))
    # Reference: q from the unpermuted tree scores, leaf j of tree t moved to expert perm[t][j].
    p, a = router.tree_probs(x), router.leaf_logits(x)
    q = torch.softmax((a + p.log()).reshape(12, -1), dim=-1).view(12, 2, 8)
    perm = router.local_search.perm_PE
    expected = torch.zeros(12, 8)
    for t in range(2):
        for j in range(8):
            expected[:, perm[t if per_tree else 0, j]] += q[:, t, j]
    torch.testing.assert_close(g_hard, expected)


@pytest.mark.parametrize("E", [6, 8])
def test_layer_matches_naive_loop(E: int) -> None:
    _, d = check_layer_matches_naive(CometConfig(k=2, entropy_coef=0.1), RouterContext(batch_size=2, seq_len=5), num_experts=E)
    assert d.valid_mask().sum(dim=1).tolist() == [E] * 10  # dense at initialisation


def test_layer_matches_naive_loop_with_local_search() -> None:
    ls = LocalSearchConfig(enabled=True, window_steps=10, tau_start=1.0, tau_end=0.1, per_tree=True)
    check_layer_matches_naive(CometConfig(k=2, local_search=ls), RouterContext(batch_size=2, seq_len=4, step=3), num_experts=4)


def test_registered_and_config_errors() -> None:
    assert ROUTERS["comet"] is CometRouter
    with pytest.raises(ConfigError, match="router.gamma"):
        CometConfig(gamma=0.0)
    with pytest.raises(ConfigError, match="router.k"):
        CometConfig(k=0)
    with pytest.raises(ConfigError, match="model.num_experts"):
        CometRouter(CometConfig(), d_model=8, num_experts=1)


def test_init_follows_the_tf_release_kernel_and_bias_uniform() -> None:
    # mazumder-lab/COMET COMETGate: split Dense(kernel=bias=U(-gamma/100, gamma/100)), leaf
    # Dense(kernel=bias=U(-0.05, 0.05)). Over 8*k*E draws each range is nearly filled, never exceeded.
    torch.manual_seed(0)
    gamma = 2.0
    router = _router(E=16, k=4, d=64, gamma=gamma)
    for p, bound in ((router.split.weight, gamma / 100), (router.split.bias, gamma / 100),
                     (router.leaf.weight, 0.05), (router.leaf.bias, 0.05)):
        assert float(p.abs().max()) <= bound
        assert float(p.abs().max()) > 0.9 * bound  # uniform over the whole range, not zeros
