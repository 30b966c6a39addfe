"""GPU-only checks of the MoE layer's glue kernels at real shapes (moe_125m: T=16,384, E=64, K=8, D=768,
F=256; olmoe's experts 64 x 2048 x 1024): compiled, each equals its torch twin, and the fused router
node runs on the card.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, A = T*K slots.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")]


@pytest.mark.parametrize("E,D,F", [(64, 768, 256), (64, 2048, 1024)])
def test_cast_many_equals_tensor_to_bit_for_bit_on_the_card(gen, E, D, F):
    """The compiled rounding on the bits is the card's own fp32 -> bf16 conversion (NaN aside), and back exactly."""
    masters = [(torch.randn(s, generator=gen) * 10.0 ** torch.randint(-20, 20, s, generator=gen)).cuda() for s in ((E, D, F), (E, D, F), (E, F, D))]
    halves = ops.cast_many(masters, torch.bfloat16)
    for h, m in zip(halves, masters):
        assert torch.equal(h.view(torch.int16), m.to(torch.bfloat16).view(torch.int16))
    for f, h in zip(ops.cast_many(halves, torch.float32), halves):
        assert torch.equal(f, h.float())


def test_plan_indices_equal_the_twin_on_the_card(gen):
    T, K = 16384, 8
    order = torch.randperm(T * K, generator=gen).cuda()
    weights = torch.rand(T * K, generator=gen).cuda()
    for rows in (T * K, T * K - 12345):
        for got, want in zip(ops.plan_indices(order, weights, K, rows), reference.plan_indices(order, weights, K, rows)):
            assert torch.equal(got, want)


def test_topk_gates_backward_equals_the_twin_on_the_card(gen):
    T, E, K = 16384, 64, 8
    logits = torch.randn(T, E, generator=gen).cuda() * 2
    probs = torch.softmax(logits, -1)
    v, ids = probs.topk(K, -1)
    sums = v.sum(-1)
    f = torch.bincount(ids.reshape(-1).cpu(), minlength=E).float().cuda() / (T * K)
    args = (probs, v / sums[:, None], ids, torch.randn(T, K, generator=gen).cuda(), sums, None, f,
            torch.tensor(1.0, device="cuda"), torch.logsumexp(logits, -1), torch.tensor(1.0, device="cuda"), 0.01 * E / T, 2 * 0.001 / T)
    torch.testing.assert_close(ops.topk_gates_bwd(*args), reference.topk_gates_bwd(*args), rtol=1e-5, atol=1e-7)


def test_top_k_router_forward_equals_the_cpu_and_its_gradient_agrees(gen):
    """The fused node's forward is the CPU path's ops (the same losses and choices, to the card's
    rounding of the same ops); its one-kernel backward matches autograd on the card."""
    from moe.routers.topk_gates import fused_gates, gates

    logits = (torch.randn(4096, 64, generator=gen) * 2).cuda().requires_grad_()
    twin = logits.detach().clone().requires_grad_()
    a, b = gates(logits, 8, True, 0.01, 0.001), fused_gates(twin, 8, True, 0.01, 0.001)
    for name in ("probs_TE", "weights_TK", "ids_TK", "counts_E", "aux", "z"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    dw = torch.randn(4096, 8, generator=gen).cuda()
    (want,) = torch.autograd.grad((a.weights_TK * dw).sum() + a.aux + a.z, logits)
    (got,) = torch.autograd.grad((b.weights_TK * dw).sum() + b.aux + b.z, twin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
