"""GPU-only checks of the compiled kernels: bf16 accuracy at larger shapes and no host syncs.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, R routed rows.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.layout import BlockSizes
from kernels.moe_experts import fused_moe_experts
from kernels.route_meta import route_meta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")


def _plan(T: int, K: int, E: int, gen: torch.Generator, skew: float = 0.0):
    from moe.dispatch import dispatch
    from moe.routers.base import RoutingDecision

    logits = torch.randn(T, E, generator=gen) - skew * torch.log1p(torch.arange(E, dtype=torch.float32))
    probs = torch.softmax(logits, -1)
    weights, ids = probs.topk(K, -1)
    plan = dispatch(RoutingDecision(expert_ids_TK=ids, weights_TK=weights, probs_TE=probs), E)
    return ids, plan


@pytest.mark.parametrize("T,K,E,D,F,skew", [(512, 2, 8, 256, 512, 0.0), (1024, 8, 64, 128, 96, 2.0)])
def test_bf16_fused_forward_and_grads(kc, gen, T, K, E, D, F, skew):
    _, plan = _plan(T, K, E, gen, skew)
    slot, w_R, counts = (t.cuda() for t in (plan.slot_idx_R, plan.weight_R, plan.counts_E))
    x = torch.randn(T, D, generator=gen).cuda()
    weights = [w.detach() for w in kc.make_weights(E, D, F, gen)]
    leaves16 = [t.bfloat16().requires_grad_() for t in (x, *weights)]
    leaves32 = [t.clone().requires_grad_() for t in (x, *weights)]
    w16, w32 = w_R.clone().requires_grad_(), w_R.clone().requires_grad_()
    y16 = fused_moe_experts(leaves16[0], slot, w16, counts, K, *leaves16[1:])
    y32 = reference.moe_experts(leaves32[0], slot, w32, counts, K, *leaves32[1:])
    kc.assert_close_scaled(y16, y32, what="y")
    dy = torch.randn(T, D, generator=gen).cuda()
    got = torch.autograd.grad(y16, (leaves16[0], w16, *leaves16[1:]), dy.bfloat16())
    want = torch.autograd.grad(y32, (leaves32[0], w32, *leaves32[1:]), dy)
    for name, g, w in zip(("dx", "dweight", "dw_gate", "dw_up", "dw_down"), got, want):
        kc.assert_close_scaled(g, w, what=name)


def test_fp32_without_tf32_is_exact_to_1e4(kc, gen):
    _, plan = _plan(256, 2, 8, gen)
    slot, w_R, counts = (t.cuda() for t in (plan.slot_idx_R, plan.weight_R, plan.counts_E))
    x = torch.randn(256, 64, generator=gen).cuda()
    weights = [w.detach() for w in kc.make_weights(8, 64, 128, gen)]
    y = fused_moe_experts(x, slot, w_R, counts, 2, *weights, blocks=BlockSizes(allow_tf32=False))
    kc.assert_close(y, reference.moe_experts(x, slot, w_R, counts, 2, *weights), what="y fp32")


@pytest.mark.parametrize("recompute", [False, True])
def test_no_host_sync_forward_backward(kc, gen, recompute):
    ids, plan = _plan(2048, 4, 16, gen, skew=1.0)
    slot, counts = plan.slot_idx_R.cuda(), plan.counts_E.cuda()
    ids = ids.cuda()
    x = torch.randn(2048, 128, generator=gen).cuda().bfloat16().requires_grad_()
    w_R = plan.weight_R.cuda().requires_grad_()
    weights = [w.detach().bfloat16().requires_grad_() for w in kc.make_weights(16, 128, 256, gen)]
    dy = torch.randn(2048, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route_meta(ids, 16, 64)
        y = fused_moe_experts(x, slot, w_R, counts, 4, *weights, recompute=recompute)
        torch.autograd.backward(y, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.grad is not None for t in (x, w_R, *weights))


def test_route_meta_large(kc, gen):
    ids = torch.randint(0, 64, (16384, 8), generator=gen)
    sorted_S, sched = route_meta(ids.cuda(), 64, 128)
    want_S, want = reference.route_meta(ids, 64, 128)
    assert torch.equal(sorted_S.cpu(), want_S)
    assert torch.equal(sched.tile_expert_N.cpu(), want.tile_expert_N)
    assert torch.equal(sched.tile_row_start_N.cpu(), want.tile_row_start_N)
