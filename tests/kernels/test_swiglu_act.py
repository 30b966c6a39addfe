"""The SwiGLU activation op (router weight folded in) against its reference, forward and backward.

Shape legend: R rows, F ffn dim. On CPU the Triton kernels run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from tests.kernel_harness import assert_kernels_run


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The op under test is the Triton kernel (compiled on CUDA, interpreted on CPU), not its reference."""
    assert_kernels_run(kc.DEVICE, "swiglu_act", "_swiglu_act_fwd_kernel")


@pytest.mark.parametrize("R,F,scaled", [(1, 16, True), (37, 24, True), (130, 600, True), (9, 40, False)])
def test_swiglu_act_matches_reference(kc, gen, R, F, scaled):
    """F=600 crosses a 512-wide column block (the backward's F loop runs twice, the last one masked)."""
    g, u, a = (torch.randn(R, F, generator=gen).to(kc.DEVICE) for _ in range(3))
    s = (torch.rand(R, generator=gen) + 0.1).to(kc.DEVICE) if scaled else None
    kc.assert_close(ops.swiglu_act(g, u, s), reference.swiglu_act(g, u, s), tol=1e-5, what="h")
    dg, du = g.clone(), u.clone()
    ds = ops.swiglu_act_bwd_(dg, du, a, s)  # in place: g -> dg, u -> du
    # The obviously-correct gradient: autograd through the fp64 forward.
    leaves = [t.double().requires_grad_() for t in (g, u)] + ([s.double().requires_grad_()] if scaled else [])
    h = torch.nn.functional.silu(leaves[0]) * leaves[1] * (leaves[2][:, None] if scaled else 1.0)
    want = torch.autograd.grad(h, leaves, a.double())
    kc.assert_close(dg, want[0], tol=1e-5, what="dg")
    kc.assert_close(du, want[1], tol=1e-5, what="du")
    if scaled:
        kc.assert_close(ds, want[2], tol=1e-4, what="dscale")
    else:
        assert ds.numel() == 0


def test_swiglu_act_reads_strided_rows(kc, gen):
    """g and u as column halves of one [R, 2F] buffer (row stride 2F) give the contiguous result."""
    gu = torch.randn(21, 2 * 48, generator=gen).to(kc.DEVICE)
    g, u = gu[:, :48], gu[:, 48:]
    s = torch.rand(21, generator=gen).to(kc.DEVICE)
    kc.assert_close(ops.swiglu_act(g, u, s), reference.swiglu_act(g.contiguous(), u.contiguous(), s), tol=1e-5, what="h")


def test_swiglu_act_bf16_rounds_once(kc, gen):
    """bf16 operands: fp32 math inside, one rounding at the store, so the result equals the reference's."""
    g, u = (torch.randn(64, 80, generator=gen).to(kc.DEVICE, torch.bfloat16) for _ in range(2))
    s = torch.rand(64, generator=gen).to(kc.DEVICE)
    got, want = ops.swiglu_act(g, u, s), reference.swiglu_act(g, u, s)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()


def test_reference_path_through_the_op_in_fp64(gen):
    """fp64 has no Triton kernel, so the op runs its pure-torch twin (the CPU path without an
    interpreter): same function, checked against autograd in fp64 through the op itself."""
    g, u, a = (torch.randn(11, 24, generator=gen, dtype=torch.float64) for _ in range(3))
    s = torch.rand(11, generator=gen, dtype=torch.float64) + 0.1
    assert not ops.triton_runs(g, ops._kernel_module("swiglu_act"), "_swiglu_act_fwd_kernel")
    leaves = [t.clone().requires_grad_() for t in (g, u, s)]
    h = torch.nn.functional.silu(leaves[0]) * leaves[1] * leaves[2][:, None]
    torch.testing.assert_close(ops.swiglu_act(g, u, s), h.detach(), atol=1e-12, rtol=1e-12)
    want = torch.autograd.grad(h, leaves, a)
    dg, du = g.clone(), u.clone()
    ds = ops.swiglu_act_bwd_(dg, du, a, s)
    for got, exp, name in zip((dg, du, ds), want, ("dg", "du", "ds")):
        torch.testing.assert_close(got, exp, atol=1e-12, rtol=1e-12, msg=name)
