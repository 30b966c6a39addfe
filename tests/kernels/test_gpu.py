"""GPU-only checks of the compiled kernels: bf16 accuracy at larger shapes and no host syncs.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, R routed rows.
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.layout import BlockSizes
from kernels.triton.moe_experts import fused_moe_experts
from kernels.triton.route_meta import route_meta

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")]


def _plan(T: int, K: int, E: int, gen: torch.Generator, skew: float = 0.0):
    from moe.dispatch import dispatch
    from moe.routers.interface import RoutingDecision

    logits = torch.randn(T, E, generator=gen) - skew * torch.log1p(torch.arange(E, dtype=torch.float32))
    probs = torch.softmax(logits, -1)
    weights, ids = probs.topk(K, -1)
    plan = dispatch(RoutingDecision(expert_ids_TK=ids, weights_TK=weights, probs_TE=probs), E)
    return ids, plan


@pytest.mark.parametrize("T,K,E,D,F,skew", [(512, 2, 8, 256, 512, 0.0), (1024, 8, 64, 128, 96, 2.0)])
def test_bf16_fused_forward_and_grads(kc, gen, T, K, E, D, F, skew):
    _, plan = _plan(T, K, E, gen, skew)
    slot, w_R, counts = (t.cuda() for t in (plan.slot_idx_R, plan.weight_R, plan.counts_E))
    _bf16_matches_fp32(kc, gen, T, K, E, D, F, slot, w_R, counts, lambda x, w, *ws: fused_moe_experts(x, slot, w, counts, K, *ws))


def _bf16_matches_fp32(kc, gen, T, K, E, D, F, slot, w_R, counts, run16):
    """``run16(x, router_weight, w_gate, w_up, w_down)`` in bf16 against the fp32 reference on fresh
    random inputs: the output and every gradient (x, router weight, the three expert weights)."""
    x = torch.randn(T, D, generator=gen).cuda()
    weights = [w.detach() for w in kc.make_weights(E, D, F, gen)]
    leaves16 = [t.bfloat16().requires_grad_() for t in (x, *weights)]
    leaves32 = [t.clone().requires_grad_() for t in (x, *weights)]
    w16, w32 = w_R.detach().clone().requires_grad_(), w_R.detach().clone().requires_grad_()
    y16 = run16(leaves16[0], w16, *leaves16[1:])
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


@pytest.mark.parametrize("regenerate_preactivations", [False, True])
def test_no_host_sync_forward_backward(kc, gen, regenerate_preactivations):
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
        y = fused_moe_experts(x, slot, w_R, counts, 4, *weights, regenerate_preactivations=regenerate_preactivations)
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


# --- experts.backend=grouped_mm on the GPU: library grouped GEMMs + the Triton glue kernels -------


@pytest.mark.parametrize("kind", ["random", "straddle", "masked", "capacity"])
def test_bf16_grouped_mm_plan_matches_fp32_reference(kc, gen, kind):
    """Forward and every gradient of the grouped_mm whole-plan path in bf16 against the fp32
    reference, on plans with idle and single-token experts, masked slots and capacity drops."""
    import dataclasses

    from moe.expert_backends import BACKENDS, ExpertOptions

    T, K, E, D, F = 32, 2, 4, 32, 40
    plan = kc.make_plan(kind, T, K, E, gen)
    plan = dataclasses.replace(plan, **{f.name: getattr(plan, f.name).cuda() for f in dataclasses.fields(plan) if isinstance(getattr(plan, f.name), torch.Tensor)})

    def run16(x, w, *ws):
        return BACKENDS["grouped_mm"].run_plan(x, dataclasses.replace(plan, weight_R=w), *ws, ExpertOptions())

    _bf16_matches_fp32(kc, gen, T, K, E, D, F, plan.slot_idx_R, plan.weight_R, plan.counts_E, run16)


@pytest.mark.parametrize("k,E,skew", [(1, 8, 0.0), (8, 64, 2.0)])
def test_bf16_grouped_mm_layer_matches_fp32_torch_layer(gen, k, E, skew):
    """The whole MoELayer with backend grouped_mm in bf16 against the same layer with the torch
    backend in fp32: output, input gradient and every parameter gradient (Zipf-like skew leaves
    experts idle at E=64)."""
    from moe.experts import ExpertsConfig
    from moe.layer import MoELayer
    from moe.routers import RouterContext
    from moe.routers.topk import TopKConfig

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    ref = MoELayer(64, 96, E, TopKConfig(k=k), ExpertsConfig(backend="torch")).cuda()
    fast = MoELayer(64, 96, E, TopKConfig(k=k), ExpertsConfig(backend="grouped_mm")).cuda().bfloat16()
    fast.load_state_dict({n: t.bfloat16() for n, t in ref.state_dict().items()})
    ref.load_state_dict({n: t.float() for n, t in fast.state_dict().items()})  # both start from the bf16 values
    with torch.no_grad():
        ref.router.gate.weight[:, 0] -= skew * torch.log1p(torch.arange(E, device="cuda", dtype=torch.float32))
        fast.router.gate.weight.copy_(ref.router.gate.weight)
    x = torch.randn(512, 64, generator=gen).cuda()
    x[:, 0] = 1.0 + x[:, 0].abs()  # the skew column pushes tokens towards low expert ids
    x32, x16 = x.bfloat16().float().requires_grad_(), x.bfloat16().requires_grad_()
    y32, _ = ref(x32, RouterContext())
    y16, _ = fast(x16, RouterContext())
    assert_rel = lambda a, b, what: torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * b.abs().max().item(), rtol=0, msg=what)  # noqa: E731
    assert_rel(y16, y32, "y")
    dy = torch.randn(512, 64, generator=gen).cuda()
    g32 = torch.autograd.grad(y32, [x32, *ref.parameters()], dy.bfloat16().float())
    g16 = torch.autograd.grad(y16, [x16, *fast.parameters()], dy.bfloat16())
    for (name, _), a, b in zip([("x", None), *ref.named_parameters()], g16, g32):
        assert_rel(a, b, name)


def test_no_host_sync_whole_layer_grouped_mm():
    """Router, dispatch, the grouped_mm experts, combine and routing statistics: one training
    forward and backward with CUDA's sync debug mode set to raise."""
    from moe.experts import ExpertsConfig
    from moe.layer import MoELayer
    from moe.routers import RouterContext
    from moe.routers.topk import TopKConfig

    layer = MoELayer(128, 256, 16, TopKConfig(k=4), ExpertsConfig(backend="grouped_mm")).cuda().bfloat16()
    layer.resolve_backend(torch.device("cuda"))
    x = torch.randn(2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2048, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second pass runs with the statistics accumulators already allocated
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y, aux = layer(x, RouterContext())
            torch.autograd.backward([y, sum(aux.values())], [dy, torch.ones((), device="cuda")])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_half_gate_logits_equal_the_fp32_gemm_of_the_same_values(gen):
    """bf16 router GEMM with fp32 accumulation and output == fp32 GEMM of the bf16 values (to fp32 rounding)."""
    from moe.routers.gate import gate_logits

    x = torch.randn(4096, 512, generator=gen).cuda().bfloat16()
    w = (torch.randn(64, 512, generator=gen) * 512**-0.5).cuda().bfloat16()
    got = gate_logits(x, w)
    assert got.dtype == torch.float32
    want = x.double() @ w.double().t()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_grouped_mm_layer_peak_memory_not_above_the_plain_layer():
    """Peak memory of one forward+backward (parameter gradients included), whole MoELayer with
    backend grouped_mm against the plain torch._grouped_mm layer, at a coarse-expert shape where
    the R x F activations dominate (the case where keeping them all through the backward cost
    1.37x the plain layer's peak at (4096, 14336, 8, 2, 8192) before they were freed as consumed)."""
    from tools.bench import layer as bench_layer

    p = bench_layer.Problem.make((1024, 4096, 8, 2, 4096), "balanced", 1.2, 0, torch.device("cuda"), torch.bfloat16)
    ours = bench_layer.run_layer(p, "grouped_mm", warmup=1, iters=2)["peak_mib"]
    plain = bench_layer.run_plain(p, warmup=1, iters=2)["peak_mib"]
    assert ours <= plain, (ours, plain)
