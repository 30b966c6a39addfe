"""BASE layers: balanced assignment (exact counts, optimal on small cases by enumeration), greedy
top-1 at evaluation, sigmoid-affinity weights that train the centroids, and the layer against the
naive loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.base_layers import BaseLayersConfig, BaseLayersRouter, balanced_assignment, dual_prices
from tests.moe.routers.naive_layer import check_layer_matches_naive


def best_balanced_total(scores_TE: torch.Tensor, capacity: int) -> float:
    """Brute force: the largest total affinity over every assignment with ``capacity`` tokens per expert."""
    T, E = scores_TE.shape
    seats = [e for e in range(E) for _ in range(capacity)]
    return max(sum(float(scores_TE[t, p[t]]) for t in range(T)) for p in set(itertools.permutations(seats)))


@pytest.mark.parametrize("T,E", [(6, 3), (8, 2), (8, 4), (6, 2)])
@pytest.mark.parametrize("sweeps", [0, 3])
def test_assignment_is_balanced_and_optimal_on_small_cases(T, E, sweeps):
    gen = torch.Generator().manual_seed(T * 10 + E)
    for _ in range(4):
        scores = torch.randn(T, E, generator=gen)
        ids = balanced_assignment(scores, T // E, eps=1e-4, dual_sweeps=sweeps, max_rounds=100_000)
        assert torch.bincount(ids, minlength=E).tolist() == [T // E] * E
        total = float(scores[torch.arange(T), ids].sum())
        bound = T * 1e-4 * float(scores.max() - scores.min())  # ε-optimality of the auction
        assert total >= best_balanced_total(scores, T // E) - bound - 1e-9


def test_uneven_counts_and_skewed_scores():
    gen = torch.Generator().manual_seed(1)
    # 1000 tokens, 7 experts (capacity 143): every token seated, no expert above capacity, even
    # when every token prefers expert 0 by a wide margin.
    scores = torch.randn(1000, 7, generator=gen)
    scores[:, 0] += 5.0
    ids = balanced_assignment(scores, 143)
    counts = torch.bincount(ids, minlength=7)
    assert int(counts.sum()) == 1000 and int(counts.max()) <= 143 and int(counts.min()) >= 1000 - 6 * 143
    # The greedy guard (1 round) still seats everyone within capacity.
    ids = balanced_assignment(scores, 143, max_rounds=1)
    assert int(torch.bincount(ids, minlength=7).max()) <= 143 and ids.shape == (1000,)


def test_dual_prices_nearly_balance():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2048, 8, generator=gen).double()
    prices = dual_prices(scores, 256, sweeps=3)
    counts = torch.bincount((scores - prices).argmax(1), minlength=8)
    assert int((counts - 256).clamp(min=0).sum()) <= 16  # a handful over capacity; the auction seats them


def test_router_balances_in_training_and_goes_greedy_at_eval():
    gen = torch.Generator().manual_seed(3)
    D, E, T = 16, 4, 64
    router = BaseLayersRouter(BaseLayersConfig(), D, E)
    x = torch.randn(T, D, generator=gen)
    d = router(x, RouterContext())
    assert torch.bincount(d.expert_ids_TK[:, 0], minlength=E).tolist() == [T // E] * E
    h = x @ router.centroids_ED.t()
    torch.testing.assert_close(d.weights_TK[:, 0], torch.sigmoid(h.gather(1, d.expert_ids_TK)[:, 0]))
    assert not d.aux_losses
    router.eval()
    d = router(x, RouterContext())
    assert torch.equal(d.expert_ids_TK[:, 0], h.argmax(1))
    router.train()
    d = router(x, RouterContext())
    d.weights_TK.sum().backward()
    assert router.centroids_ED.grad is not None and float(router.centroids_ED.grad.abs().sum()) > 0


def test_layer_matches_naive():
    check_layer_matches_naive(BaseLayersConfig(), RouterContext(batch_size=2, seq_len=6))


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match=r"router.eps \(0\)"):
        BaseLayersConfig(eps=0)
    with pytest.raises(ConfigError, match=r"router.max_rounds \(0\)"):
        BaseLayersConfig(max_rounds=0)
