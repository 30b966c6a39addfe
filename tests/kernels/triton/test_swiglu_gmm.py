"""kernels.triton.swiglu_gmm (up projection, fused SwiGLU) and kernels.triton.gather_gmm (the bare gathered GEMM)
against the pure-torch reference, forward and gradients.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, R routed rows.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.layout import BlockSizes
from kernels.triton.gather_gmm import gather_gmm
from kernels.triton.route_meta import tile_schedule
from kernels.triton.swiglu_gmm import gather_gmm_swiglu, swiglu_fwd

TINY = BlockSizes(block_m=16, block_n=16, block_k=16, block_r=16)


def _setup(kc, gen, kind):
    T, K, E, D, F = (kc.SMALL[k] for k in "TKEDF")
    plan = kc.make_plan(kind, T, K, E, gen)
    x_TD = torch.randn(T, D, generator=gen).to(kc.DEVICE).requires_grad_()
    slot_R = plan.slot_idx_R.to(kc.DEVICE)
    sched = tile_schedule(plan.counts_E.to(kc.DEVICE), plan.num_rows, TINY.block_m)
    return plan, x_TD, slot_R, sched, kc.make_weights(E, D, F, gen)


@pytest.mark.parametrize("kind", ["random", "straddle", "masked"])
def test_gather_gmm_swiglu_forward_and_grads(kc, gen, kind):
    plan, x_TD, slot_R, sched, (wg, wu, _) = _setup(kc, gen, kind)
    K = kc.SMALL["K"]
    h_RF = gather_gmm_swiglu(x_TD, slot_R, sched, K, wg, wu, blocks=TINY)
    want_RF = reference.gather_gmm_swiglu(x_TD, slot_R, sched, K, wg, wu)
    kc.assert_close(h_RF, want_RF, what="h")
    dh_RF = torch.randn(h_RF.shape, generator=gen).to(kc.DEVICE)
    got = torch.autograd.grad(h_RF, (x_TD, wg, wu), dh_RF)
    want = torch.autograd.grad(want_RF, (x_TD, wg, wu), dh_RF)
    for name, g, w in zip(("dx", "dw_gate", "dw_up"), got, want):
        kc.assert_close(g, w, what=name)
    # The expert E-1 of "random"/"masked" has no rows: its weight gradients are exactly zero.
    if kind != "straddle":
        assert torch.count_nonzero(got[1][-1]) == 0 and torch.count_nonzero(got[2][-1]) == 0


def test_swiglu_fwd_stores_pre_activations(kc, gen):
    plan, x_TD, slot_R, sched, (wg, wu, _) = _setup(kc, gen, "straddle")
    K = kc.SMALL["K"]
    h_RF, g_RF, u_RF = swiglu_fwd(x_TD.detach(), slot_R, sched, K, wg.detach(), wu.detach(), TINY, store_pre=True)
    kc.assert_close(g_RF, reference.gather_gmm(x_TD.detach(), slot_R, K, sched, wg.detach()), what="g")
    kc.assert_close(u_RF, reference.gather_gmm(x_TD.detach(), slot_R, K, sched, wu.detach()), what="u")
    kc.assert_close(h_RF, torch.nn.functional.silu(g_RF) * u_RF, what="h")
    none_h, g2, _ = swiglu_fwd(x_TD.detach(), slot_R, sched, K, wg.detach(), wu.detach(), TINY, store_h=False, store_pre=True)
    assert none_h is None and torch.equal(g2, g_RF)


@pytest.mark.parametrize("row_div", [1, 2, None])
def test_gather_gmm_plain(kc, gen, row_div):
    """Rows gathered by slot (div 1), by token (div K) or already expert-sorted (None)."""
    plan, _, slot_R, sched, (wg, _, _) = _setup(kc, gen, "masked")
    R, D = plan.num_rows, kc.SMALL["D"]
    rows = {1: 2 * kc.SMALL["T"], 2: kc.SMALL["T"], None: R}[row_div]
    a = torch.randn(rows, D, generator=gen).to(kc.DEVICE)
    got = gather_gmm(a, slot_R, row_div, sched, wg.detach(), TINY)
    want = reference.gather_gmm(a, slot_R if row_div else torch.arange(R), row_div or 1, sched, wg.detach())
    kc.assert_close(got, want, what="c")
