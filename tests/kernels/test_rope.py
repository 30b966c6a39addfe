"""The fused RoPE op against the model's reference, forward and backward, on strided head views.

Shape legend: B batch, H heads, S positions, d head dim. On CPU the Triton kernel runs in the
interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from moe.model import apply_rope, apply_rope_reference, rope_tables
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "rope", "_rope_kernel")


@pytest.mark.parametrize("B,H,S,d", [(1, 1, 1, 2), (2, 3, 17, 16), (1, 2, 9, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_op_equals_the_reference_forward_and_backward(kc, gen, B, H, S, d, dtype):
    """Heads taken as a transposed view of a fused [B, S, 3H, d] projection (non-contiguous, as the
    attention's q and k are); d = 40 leaves a masked half-block of 20 of 32 columns."""
    cos, sin = (t.to(kc.DEVICE) for t in rope_tables(S + 3, d, 10000.0, torch.device("cpu")))
    cos, sin = cos[3:], sin[3:]  # rows of positions 3.., as a KV-cached forward slices them
    fused = torch.randn(B, S, 3 * H, d, generator=gen).to(kc.DEVICE, dtype)
    x = fused.transpose(1, 2)[:, H : 2 * H]
    dy = torch.randn(B, H, S, d, generator=gen).to(kc.DEVICE, dtype)
    y = ops.rope(x, cos, sin, False)
    want = apply_rope_reference(x, cos, sin)
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()  # x's dimension order, as torch's ops keep it
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: both round the same fp32 value (may differ by one step)
    torch.testing.assert_close(y.float(), want.float(), rtol=tol, atol=tol)
    # The backward is the inverse rotation: equal to autograd through the fp64 reference.
    x64 = x.double().requires_grad_()
    (want_dx,) = torch.autograd.grad(apply_rope_reference(x64, cos.double(), sin.double()), x64, dy.double())
    torch.testing.assert_close(ops.rope(dy, cos, sin, True).double(), want_dx, rtol=tol, atol=tol)


def test_model_rope_takes_the_kernel_on_a_card_only(kc, gen, monkeypatch):
    """``apply_rope`` on ``meta`` (the step budget's GPU) is one op each way; on the CPU it keeps its
    torch ops (the default CPU run's numbers)."""
    from tools.bench.op_counter import OpCounter

    cos, sin = rope_tables(8, 16, 10000.0, torch.device("cpu"))
    x = torch.empty(2, 4, 8, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cos_m, sin_m, dy = cos.to("meta"), sin.to("meta"), torch.empty(2, 4, 8, 16, device="meta", dtype=torch.bfloat16)
    with OpCounter() as counter:
        apply_rope(x, cos_m, sin_m).backward(dy)
    assert [r.name for r in counter.budget.ops] == ["moeforge.rope.default"] * 2
    x = torch.randn(2, 4, 8, 16, generator=gen)
    calls = []
    monkeypatch.setattr(ops, "rope", lambda *a: calls.append(a))
    apply_rope(x, cos, sin)
    assert not calls
