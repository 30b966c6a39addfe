"""route_meta / tile_schedule (Triton) against the pure-torch reference and the dispatch contract.

Shape legend: T tokens, K slots, E experts, S slots (T*K), N tiles.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.triton.route_meta import route_meta, tile_schedule
from moe.dispatch import dispatch
from moe.routers.interface import RoutingDecision


def _assert_schedule_equal(got, want) -> None:
    for name in ("expert_offsets_E1", "tile_expert_N", "tile_row_start_N"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name


@pytest.mark.parametrize("T,K,E,block_m", [(32, 2, 4, 16), (29, 3, 3, 16), (7, 1, 20, 16)])
def test_route_meta_matches_stable_sort(kc, gen, T, K, E, block_m):
    ids_TK = torch.randint(0, E, (T, K), generator=gen)
    ids_TK[0, 0] = E - 1  # at least one row for the last expert; experts with none are common at E=20
    sorted_S, sched = route_meta(ids_TK.to(kc.DEVICE), E, block_m)
    want_S, want_sched = reference.route_meta(ids_TK, E, block_m)
    assert sorted_S.dtype == torch.int32 and sched.expert_offsets_E1.dtype == torch.int32
    assert torch.equal(sorted_S.cpu(), want_S)
    _assert_schedule_equal(sched, want_sched)
    # Independent facts: expert ids are non-decreasing along the sort, slots increase inside an expert.
    ids_sorted = ids_TK.reshape(-1)[sorted_S.cpu().long()]
    assert bool((ids_sorted[1:] >= ids_sorted[:-1]).all())
    same = ids_sorted[1:] == ids_sorted[:-1]
    assert bool((sorted_S.cpu()[1:][same] > sorted_S.cpu()[:-1][same]).all())


@pytest.mark.parametrize("kind", ["random", "straddle"])
def test_route_meta_equals_dispatch_order(kc, gen, kind):
    """Our sorted slots are exactly DispatchPlan.slot_idx_R and offsets_E1 (the shared contract)."""
    ids_TK = kc.routing_ids(kind, 32, 2, 4, gen)
    decision = RoutingDecision(expert_ids_TK=ids_TK, weights_TK=torch.rand(32, 2, generator=gen), probs_TE=torch.rand(32, 4, generator=gen))
    plan = dispatch(decision, 4)
    sorted_S, sched = route_meta(ids_TK.to(kc.DEVICE), 4, 16)
    assert torch.equal(sorted_S.cpu().long(), plan.slot_idx_R)
    assert torch.equal(sched.expert_offsets_E1.cpu().long(), plan.offsets_E1)


@pytest.mark.parametrize("kind", ["masked", "capacity"])
def test_tile_schedule_of_dropped_plans(kc, gen, kind):
    """Schedules built from the counts of plans with R < T*K (what fused_moe_experts does)."""
    plan = kc.make_plan(kind, 32, 2, 4, gen)
    assert plan.num_rows < 64
    sched = tile_schedule(plan.counts_E.to(kc.DEVICE), plan.num_rows, 16)
    _assert_schedule_equal(sched, reference.tile_schedule(plan.counts_E, plan.num_rows, 16))


def test_tile_schedule_edge_counts(kc):
    """Empty experts get no tile, exact multiples of block_m no extra tile, unused tiles are -1."""
    counts_E = torch.tensor([0, 16, 1, 0, 17, 32], dtype=torch.int64)
    sched = tile_schedule(counts_E.to(kc.DEVICE), 66, 16)
    # Rows: e1 0..15, e2 16, e4 17..33, e5 34..65 -> tiles e1:1, e2:1, e4:2, e5:2 = 6 of max 5+6=11.
    assert sched.tile_expert_N.cpu().tolist() == [1, 2, 4, 4, 5, 5] + [-1] * 5
    assert sched.tile_row_start_N.cpu().tolist()[:6] == [0, 16, 17, 33, 34, 50]
    assert sched.expert_offsets_E1.cpu().tolist() == [0, 0, 16, 17, 17, 34, 66]
