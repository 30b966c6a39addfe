"""DSelect-k gate: binary-code selectors, exact sparsity once saturated (routers.md §5)."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import ROUTERS, RouterContext
from moe.routers.dselect_k import DSelectKConfig, DSelectKRouter, binary_codes, selector_outputs
from moe.routers.local_search import LocalSearchConfig
from moe.routers.smooth_gates import smooth_step
from tests.moe.routers.naive_layer import check_layer_matches_naive


def _g(router: DSelectKRouter, x_TD: torch.Tensor, step: int = 0) -> torch.Tensor:
    d = router(x_TD, RouterContext(step=step))
    return torch.zeros_like(d.probs_TE).scatter(1, d.expert_ids_TK, d.weights_TK * d.valid_mask())


def test_binary_codes_most_significant_bit_first() -> None:
    assert binary_codes(6).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]]
    assert binary_codes(2).int().tolist() == [[0], [1]]


def test_selectors_match_per_expert_product() -> None:
    torch.manual_seed(0)
    s = torch.rand(5, 2, 3, dtype=torch.float64)
    r = selector_outputs(s, binary_codes(8))
    for e in range(8):
        bits = [(e >> 2) & 1, (e >> 1) & 1, e & 1]
        expected = torch.ones(5, 2, dtype=torch.float64)
        for m, bit in enumerate(bits):
            expected = expected * (s[..., m] if bit else 1 - s[..., m])
        torch.testing.assert_close(r[..., e], expected)


@pytest.mark.parametrize("E", [2, 4, 8, 16])
def test_selectors_and_weights_sum_to_one_for_power_of_two(E: int) -> None:
    torch.manual_seed(E)
    k = min(3, E)  # router.k <= model.num_experts (RouterConfig.check_num_experts)
    router = DSelectKRouter(DSelectKConfig(k=k), d_model=16, num_experts=E)
    torch.nn.init.normal_(router.z.weight, std=0.3)  # a spread of in-band and saturated codes
    x = torch.randn(40, 16)
    torch.testing.assert_close(router.selectors(x).sum(dim=-1), torch.ones(40, k))
    torch.testing.assert_close(_g(router, x).sum(dim=-1), torch.ones(40))
    assert "dselect_reachability" not in router(x, RouterContext()).aux_losses


def test_non_power_of_two_loses_mass_and_pays_reachability() -> None:
    torch.manual_seed(1)
    router = DSelectKRouter(DSelectKConfig(k=2, reachability_coef=1.0), d_model=16, num_experts=6)
    x = torch.randn(20, 16)
    reach = router.selectors(x).sum(dim=-1).detach()
    # Codes 110 and 111 are unreachable: reachable mass = 1 - S(z_0) S(z_1), about 3/4 at init.
    s = smooth_step(router.code_logits(x), 1.0).detach()
    torch.testing.assert_close(reach, 1 - s[..., 0] * s[..., 1])
    assert (reach < 0.9).all() and (reach > 0.6).all()
    d = router(x, RouterContext())
    expected = float((1 / reach - 1).sum(dim=-1).mean())
    assert d.aux_losses["dselect_reachability"].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(d.probs_TE.sum(dim=-1), torch.ones(20))


def test_dense_at_init_then_at_most_k_when_saturated() -> None:
    torch.manual_seed(2)
    E, k, gamma, trials = 8, 2, 1.0, 200
    router = DSelectKRouter(DSelectKConfig(k=k, gamma=gamma), d_model=16, num_experts=E)
    x = torch.randn(trials, 16)
    assert ((_g(router, x) > 0).sum(dim=-1) == E).all()
    sign = torch.randint(0, 2, (trials, k, 3)) * 2 - 1
    z = sign * (gamma / 2 + torch.rand(trials, k, 3))
    router.code_logits = lambda x_TD: z  # type: ignore[method-assign]
    d = router(x, RouterContext())
    g = torch.zeros(trials, E).scatter(1, d.expert_ids_TK, d.weights_TK)
    nnz = (g > 0).sum(dim=-1)
    assert torch.equal(d.valid_mask().sum(dim=1), nnz)  # what dispatch runs
    assert nnz.max() <= k and (nnz == k).sum() > trials // 2
    torch.testing.assert_close(g.sum(dim=-1), torch.ones(trials))
    # Saturated selector i is one-hot on the expert whose code is its sign pattern.
    chosen = ((sign > 0).long() * torch.tensor([4, 2, 1])).sum(dim=-1)  # [trials, k]
    for t in range(5):
        assert set(torch.nonzero(g[t]).flatten().tolist()) == set(chosen[t].tolist())


def test_weights_are_softmax_mixture_of_selectors() -> None:
    torch.manual_seed(3)
    router = DSelectKRouter(DSelectKConfig(k=3, entropy_coef=0.2), d_model=16, num_experts=8)
    x = torch.randn(10, 16)
    s = smooth_step(x @ router.z.weight.t() + router.z.bias, 1.0).view(10, 3, 3)
    alpha = torch.softmax(x @ router.alpha.weight.t() + router.alpha.bias, dim=-1)
    r = selector_outputs(s, binary_codes(8)).detach()
    torch.testing.assert_close(_g(router, x), (alpha.unsqueeze(-1) * r).sum(dim=1))
    d = router(x, RouterContext())
    expected = 0.2 * float(-(r * r.log()).sum(dim=-1).mean(dim=0).sum())
    assert d.aux_losses["dselect_entropy"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("E", [4, 6])
def test_layer_matches_naive_loop(E: int) -> None:
    check_layer_matches_naive(DSelectKConfig(k=2, entropy_coef=0.1), RouterContext(batch_size=2, seq_len=5), num_experts=E)


def test_layer_matches_naive_loop_with_local_search() -> None:
    ls = LocalSearchConfig(enabled=True, window_steps=10, tau_start=1.0, tau_end=0.1, per_tree=True)
    check_layer_matches_naive(DSelectKConfig(k=2, local_search=ls), RouterContext(batch_size=1, seq_len=6, step=2), num_experts=4)


def test_registered_and_config_errors() -> None:
    assert ROUTERS["dselect_k"] is DSelectKRouter
    with pytest.raises(ConfigError, match="router.gamma"):
        DSelectKConfig(gamma=-1.0)
    with pytest.raises(ConfigError, match="router.reachability_coef"):
        DSelectKConfig(reachability_coef=-1.0)
