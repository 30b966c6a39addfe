"""gmm_scatter (down projection, router weight in the epilogue, per-slot output) vs the reference.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, S slots, R routed rows.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.layout import BlockSizes
from kernels.triton.gmm_scatter import gmm_scatter, gmm_scatter_raw
from kernels.triton.route_meta import tile_schedule

TINY = BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16)


@pytest.mark.parametrize("kind", ["random", "straddle", "capacity"])
def test_gmm_scatter_forward_and_grads(kc, gen, kind):
    T, K, E, D, F = (kc.SMALL[k] for k in "TKEDF")
    plan = kc.make_plan(kind, T, K, E, gen)
    R, S = plan.num_rows, T * K
    slot_R = plan.slot_idx_R.to(kc.DEVICE)
    sched = tile_schedule(plan.counts_E.to(kc.DEVICE), R, TINY.block_m)
    h_RF = torch.randn(R, F, generator=gen).to(kc.DEVICE).requires_grad_()
    weight_R = plan.weight_R.detach().to(kc.DEVICE).requires_grad_()
    _, _, wd = kc.make_weights(E, D, F, gen)
    y_SD = gmm_scatter(h_RF, weight_R, slot_R, sched, wd, S, blocks=TINY)
    want_SD = reference.gmm_scatter(h_RF, weight_R, slot_R, sched, wd, S)
    kc.assert_close(y_SD, want_SD, what="y")
    if kind == "capacity":  # dropped slots read exactly zero
        kept = torch.zeros(S, dtype=torch.bool)
        kept[plan.slot_idx_R] = True
        assert R < S and torch.count_nonzero(y_SD.detach().cpu()[~kept]) == 0
    dy_SD = torch.randn(S, D, generator=gen).to(kc.DEVICE)
    got = torch.autograd.grad(y_SD, (h_RF, weight_R, wd), dy_SD)
    want = torch.autograd.grad(want_SD, (h_RF, weight_R, wd), dy_SD)
    for name, g, w in zip(("dh", "dweight", "dw_down"), got, want):
        kc.assert_close(g, w, what=name)


def test_gmm_scatter_two_pairs_on_transposed_strides(kc, gen):
    """The dgrad use: y[slot] = a1 @ B1^T + a2 @ B2^T with B given as transposed views (no copy)."""
    T, K, E, D, F = (kc.SMALL[k] for k in "TKEDF")
    plan = kc.make_plan("straddle", T, K, E, gen)
    R, S = plan.num_rows, T * K
    slot_R = plan.slot_idx_R.to(kc.DEVICE)
    sched = tile_schedule(plan.counts_E.to(kc.DEVICE), R, TINY.block_m)
    a1, a2 = (torch.randn(R, F, generator=gen).to(kc.DEVICE) for _ in range(2))
    wg, wu, _ = (w.detach() for w in kc.make_weights(E, D, F, gen))
    got = gmm_scatter_raw(a1, a2, wg.transpose(1, 2), wu.transpose(1, 2), None, slot_R, sched, S, TINY)
    ones = torch.ones(R, device=kc.DEVICE)
    want = reference.gmm_scatter(a1, ones, slot_R, sched, wg.transpose(1, 2), S) + reference.gmm_scatter(a2, ones, slot_R, sched, wu.transpose(1, 2), S)
    kc.assert_close(got, want, what="dx slots")
