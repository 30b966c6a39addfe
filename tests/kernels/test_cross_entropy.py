"""The per-chunk cross-entropy kernel against its torch reference, and the chunked loss that uses it.

Shape legend: C rows, V vocabulary, T tokens, D model dim. On CPU the Triton kernel runs in the
interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.cross_entropy import BLOCK_V
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "cross_entropy", "_cross_entropy_kernel")


def _logits(C: int, V: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random fp32 logits with hard rows: one whose maximum sits in the last vocabulary block (the
    running sum is rescaled late), one with a spread of +-80 (exp under- and overflow territory)."""
    z = torch.randn(C, V, generator=gen) * 3
    z[0, -1] = 40.0
    if C > 1:
        z[1] = torch.linspace(-80, 80, V)[torch.randperm(V, generator=gen)]
    return z.to(device)


@pytest.mark.parametrize("C,V", [(1, 5), (7, 37), (5, BLOCK_V + 904)])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_rows_match_the_reference(kc, gen, C, V, grad_dtype):
    """V = BLOCK_V + 904 takes two vocabulary blocks, the second one masked."""
    z = _logits(C, V, gen, kc.DEVICE)
    y = torch.randint(0, V, (C,), generator=gen).to(kc.DEVICE)
    scale = float(torch.rand((), generator=gen)) + 0.1
    before = z.clone()
    loss, g = ops.cross_entropy_rows(z, y, scale, grad_dtype, True)
    want_loss, want_g = reference.cross_entropy_rows(z, y, scale, grad_dtype, True)
    assert torch.equal(z, before)  # the logits are read, not overwritten
    assert loss.dtype == torch.float32 and g.dtype == grad_dtype and g.shape == (C, V)
    kc.assert_close(loss, want_loss, tol=1e-6, what="loss")
    if grad_dtype == torch.float32:
        kc.assert_close(g, want_g, tol=1e-6, what="dlogits")
        # Each row of the gradient sums to 0 (softmax sums to 1, the one-hot too), times scale.
        assert g.sum(1).abs().max() < 1e-5 * scale
    else:  # both round the same fp32 value to bf16; they may differ by one bf16 step
        torch.testing.assert_close(g.float(), want_g.float(), rtol=8e-3, atol=1e-6)


def test_loss_only_writes_no_gradient(kc, gen):
    z = _logits(6, 300, gen, kc.DEVICE)
    y = torch.randint(0, 300, (6,), generator=gen).to(kc.DEVICE)
    loss, g = ops.cross_entropy_rows(z, y, 1.0, torch.bfloat16, False)
    assert g.numel() == 0
    kc.assert_close(loss, reference.cross_entropy_rows(z, y, 1.0, torch.bfloat16, False)[0], tol=1e-6, what="loss")


def test_the_fake_op_counts_one_kernel_that_reads_the_logits_once():
    from tools.bench.op_counter import OpCounter

    C, V = 1334, 50304
    z = torch.empty(C, V, device="meta")
    y = torch.empty(C, dtype=torch.int64, device="meta")
    with OpCounter() as counter:
        loss, g = ops.cross_entropy_rows(z, y, 0.5, torch.bfloat16, True)
    assert (loss.shape, loss.dtype, g.shape, g.dtype) == ((C,), torch.float32, (C, V), torch.bfloat16)
    [op] = counter.budget.ops
    assert op.launches == 1
    assert op.bytes == C * V * 4 + C * 8 + C * 4 + C * V * 2  # logits in, targets in, losses out, bf16 gradient out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_through_the_kernel_equals_the_full_logits_loss(kc, gen, monkeypatch, reduction):
    """The GPU path of ``moe.head_loss`` (the kernel, ``dx`` written and ``dW`` accumulated by the
    GEMMs) run here in fp32, where it must equal the plain loss to rounding."""
    from moe import autocast, head_loss

    monkeypatch.setattr(autocast, "GPU_PATH_DEVICES", (kc.DEVICE.type,))
    T, D, V = 61, 24, 37
    x = torch.randn(T, D, generator=gen).to(kc.DEVICE).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.3).to(kc.DEVICE).requires_grad_()
    y = torch.randint(0, V, (T,), generator=gen).to(kc.DEVICE)
    got = head_loss.head_cross_entropy(x, w, y, reduction, chunk=16)
    want = head_loss.head_cross_entropy_reference(x, w, y, reduction)
    kc.assert_close(got, want, tol=1e-6, what="loss")
    for name, a, b in zip(("dx", "dW"), torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
        kc.assert_close(a, b, tol=1e-6, what=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernel, mm/addmm with out_dtype)")
def test_gpu_full_vocabulary_chunk_and_bf16_chunked_loss(kc, gen):
    """At the real shapes: one 256 MiB chunk of V = 50,304 logits (fp32 gradient: the compiled
    kernel's exp and online sum against torch's, 1e-6), then the whole chunked loss in bf16 (fp32
    logits, dx and dW written or accumulated by the GEMMs with out_dtype) against fp64."""
    from moe.head_loss import head_cross_entropy, head_cross_entropy_reference

    C, V = 1334, 50304
    z = (torch.randn(C, V, generator=gen) * 4).cuda()
    y = torch.randint(0, V, (C,), generator=gen).cuda()
    loss, g = ops.cross_entropy_rows(z, y, 1 / 16384, torch.float32, True)
    want_loss, want_g = reference.cross_entropy_rows(z, y, 1 / 16384, torch.float32, True)
    kc.assert_close(loss, want_loss, tol=1e-6, what="loss")
    kc.assert_close(g, want_g, tol=1e-6, what="dlogits")

    T, D = 2048, 256
    x = torch.randn(T, D, generator=gen).cuda().requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.05).cuda().requires_grad_()
    y = torch.randint(0, V, (T,), generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = head_cross_entropy(x, w, y, chunk=600)  # 4 chunks, the last one short
    got_grads = torch.autograd.grad(got, (x, w))
    x64, w64 = x.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    want = head_cross_entropy_reference(x64, w64, y)
    want_grads = torch.autograd.grad(want, (x64, w64))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # fp32-accumulated logits of bf16 operands
    for name, a, b in zip(("dx", "dW"), got_grads, want_grads):
        assert a.dtype == torch.float32, name
        kc.assert_close_scaled(a, b, tol=2e-2, what=name)  # the logit gradient rounded to bf16
