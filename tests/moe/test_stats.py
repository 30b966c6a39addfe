"""RoutingStats: the accumulated sums equal a direct computation over the same forwards."""

from __future__ import annotations

import math

import torch

from moe.dispatch import dispatch
from moe.routers.interface import RoutingDecision
from moe.stats import RoutingStats


def _decision(T: int, K: int, E: int, gen: torch.Generator, masked: bool) -> RoutingDecision:
    probs = torch.softmax(torch.randn(T, E, generator=gen) * 2, -1)
    weights, ids = probs.topk(K, -1)
    mask = None
    if masked:
        mask = torch.rand(T, K, generator=gen) > 0.4
        mask[:, 0] = True
        weights = weights * mask
    aux = {"aux_loss": torch.rand((), generator=gen), "z_loss": torch.rand((), generator=gen)}
    return RoutingDecision(expert_ids_TK=ids, weights_TK=weights, probs_TE=probs, mask_TK=mask, aux_losses=aux, extras={"temperature": float(torch.rand((), generator=gen))})


def test_sums_over_mixed_forwards_equal_a_direct_computation():
    """Four forwards (unmasked, masked, capacity-dropped, unmasked): every logged statistic equals
    its formula applied to the concatenated forwards (fp64), and raw() hands out fresh tensors."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    T, K, E = 40, 3, 6
    stats = RoutingStats(E)
    cases = [(False, None), (True, None), (False, 0.5), (False, None)]
    counts = torch.zeros(E, dtype=torch.float64)
    entropy = slots = routed = dropped = tokens = 0.0
    ept_max = 0.0
    aux_sum = {"aux_loss": 0.0, "z_loss": 0.0, "temperature": 0.0}
    for masked, cf in cases:
        d = _decision(T, K, E, gen, masked)
        plan = dispatch(d, E, cf)
        stats.update(d, plan)
        used = d.valid_mask()
        counts += plan.counts_E.double()
        p = d.probs_TE.double()
        entropy += float(-(p * p.log()).sum())
        slots += float(used.sum())
        routed += float(used.sum())
        dropped += float(used.sum()) - plan.num_rows
        tokens += T
        ept_max = max(ept_max, float(used.sum(1).max()))
        for k in ("aux_loss", "z_loss"):
            aux_sum[k] += float(d.aux_losses[k])
        aux_sum["temperature"] += d.extras["temperature"]
    sums, maxes = stats.raw()
    again, _ = stats.raw()
    assert sums["counts_E"] is not again["counts_E"]  # fresh tensors: an in-place all-reduce never touches the accumulators
    out = RoutingStats.summarize(sums, maxes)
    assert out["tokens_per_expert"] == [int(c) for c in counts.tolist()]
    assert math.isclose(out["load_cv"], float(counts.std(unbiased=False) / counts.mean()), rel_tol=1e-9)
    assert math.isclose(out["entropy"], entropy / tokens, rel_tol=1e-6)
    assert math.isclose(out["experts_per_token_mean"], slots / tokens, rel_tol=1e-12)
    assert out["experts_per_token_max"] == ept_max == K
    assert out["dead_fraction"] == float((counts == 0).sum()) / E
    assert dropped > 0 and math.isclose(out["dropped_frac"], dropped / routed, rel_tol=1e-12)
    for k, v in aux_sum.items():
        assert math.isclose(out[k], v / len(cases), rel_tol=1e-6), k


def test_masked_forward_max_is_kept_after_unmasked_forwards():
    """The running max of experts per token mixes host (unmasked: K) and device (masked) values."""
    gen = torch.Generator().manual_seed(3)
    stats = RoutingStats(8)
    d = _decision(16, 2, 8, gen, masked=False)
    stats.update(d, dispatch(d, 8))
    wide = _decision(16, 5, 8, gen, masked=True)
    stats.update(wide, dispatch(wide, 8))
    stats.update(d, dispatch(d, 8))
    assert stats.raw()[1]["experts_per_token_max"].item() == float(wide.mask_TK.sum(1).max())


def test_load_raw_carries_a_half_done_window():
    """Sums taken mid-window and loaded into a fresh accumulator, plus the rest of the window,
    summarise exactly like the uninterrupted window (a resumed run's first log line)."""
    gen = torch.Generator().manual_seed(5)
    decisions = [_decision(24, 2, 6, gen, masked=m) for m in (False, True, False)]
    whole, first, rest = RoutingStats(6), RoutingStats(6), RoutingStats(6)
    for d in decisions:
        whole.update(d, dispatch(d, 6))
    first.update(decisions[0], dispatch(decisions[0], 6))
    rest.load_raw(*first.raw())
    for d in decisions[1:]:
        rest.update(d, dispatch(d, 6))
    assert RoutingStats.summarize(*rest.raw()) == RoutingStats.summarize(*whole.raw())
    empty = RoutingStats(6)
    empty.load_raw(*first.raw())
    assert RoutingStats.summarize(*empty.raw()) == RoutingStats.summarize(*first.raw())


def test_dead_fraction_counts_the_experts_with_no_load_in_the_window():
    """Tokens routed only to experts 1 and 4 of 6: four of six experts are dead; a later forward
    in the same window that reaches expert 0 revives it (3 of 6), and a reset window starts over."""
    E = 6
    probs = torch.full((5, E), 1.0 / E)
    ids = torch.tensor([[1, 4]] * 5)
    only_1_4 = RoutingDecision(expert_ids_TK=ids, weights_TK=torch.full((5, 2), 0.5), probs_TE=probs, mask_TK=None, aux_losses={})
    stats = RoutingStats(E)
    stats.update(only_1_4, dispatch(only_1_4, E))
    assert RoutingStats.summarize(*stats.raw())["dead_fraction"] == 4 / 6
    with_0 = RoutingDecision(expert_ids_TK=torch.tensor([[0, 1]]), weights_TK=torch.full((1, 2), 0.5), probs_TE=probs[:1], mask_TK=None, aux_losses={})
    stats.update(with_0, dispatch(with_0, E))
    out = RoutingStats.summarize(*stats.raw())
    assert out["tokens_per_expert"] == [1, 6, 0, 0, 5, 0] and out["dead_fraction"] == 3 / 6
    stats.reset()
    stats.update(with_0, dispatch(with_0, E))
    assert RoutingStats.summarize(*stats.raw())["dead_fraction"] == 4 / 6
