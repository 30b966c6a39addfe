"""The fused RMSNorm ops and the model's norm on a GPU, against the model's reference (forward and gradients).

Shape legend: B batch, S positions, H heads, d head dim, D normalised width, R rows. On CPU the
Triton kernels run in the interpreter; fp64 autograd through ``moe.model.rms_norm_reference`` is the truth.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from kernels.rms_norm import row_levels
from moe.autocast import meta_autocast
from moe.model import RMSNorm, fused_add_rms_norm, fused_rms_norm, rms_norm_reference
from tests.kernel_harness import assert_kernels_run

EPS = 1e-5
BF16_STEP = 2.0**-7
"""One bf16 step (8 significant bits) relative: a compiled kernel rounds fp32 to nearest (within half a
step), Triton's interpreter truncates (within one step)."""


@pytest.fixture(autouse=True)
def _the_kernel_runs(kc):
    """The ops under test are the Triton kernels (compiled on CUDA, interpreted on CPU), not the reference."""
    assert_kernels_run(kc.DEVICE, "rms_norm", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel")


def _layout(kind: str, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)`` views of fresh random data.

    rows: [3, 37, 200] contiguous (D = 200 masks 56 of 256 columns; R = 111 rows are 7 blocks of 16,
    so each of the interpreter's 4 backward programs loops, the last block half empty);
    strided: the columns 16..64 of [2, 9, 80] rows (one row stride of 80), dy a transposed view (2 levels);
    per_head: the middle 3 heads of a [B, S, 3H, d] projection viewed [B, H, S, d] (3 levels), dy contiguous.
    """
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    if kind == "rows":
        return rnd(3, 37, 200), rnd(3, 37, 200)
    if kind == "strided":
        return rnd(2, 9, 80)[..., 16:64], rnd(9, 2, 48).transpose(0, 1)
    return rnd(2, 7, 9, 24).transpose(1, 2)[:, 3:6], rnd(2, 3, 7, 24)


def _truth(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, dx, dw)`` by fp64 autograd through the model's reference."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y = rms_norm_reference(x64, w64, EPS)
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: 1e-5 relative; bf16: one rounding step (2^-7 relative), both with an absolute floor of
    1e-6 of the largest value (terms that cancel to near zero)."""
    assert got.dtype == dtype, what
    rtol = 1e-5 if dtype == torch.float32 else BF16_STEP
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6 * want.abs().max().item(), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rows", "strided", "per_head"])
def test_rms_norm_ops_equal_the_reference_forward_and_backward(kc, gen, monkeypatch, kind, dtype, out_dtype):
    """With the backward cut to 3 programs, each loops over several row blocks (rows: 7 blocks)."""
    monkeypatch.setattr(ops, "RMS_NORM_DW_PROGRAMS", 3)
    x, dy = _layout(kind, gen, kc.DEVICE, dtype)
    dy = dy.to(out_dtype)
    w = (torch.rand(x.shape[-1], generator=gen) + 0.5).to(kc.DEVICE)
    y, rstd = ops.rms_norm(x, w, EPS, out_dtype)
    want_y, want_dx, want_dw = _truth(x, w, dy)
    assert y.shape == x.shape and y.is_contiguous() and rstd.shape == x.shape[:-1]
    _close(y, want_y, out_dtype, "y")
    _close(rstd, x.double().pow(2).mean(-1).add(EPS).rsqrt(), torch.float32, "rstd")
    dx, dw_parts = ops.rms_norm_backward(dy, x, w, rstd)
    assert dw_parts.shape == (3, x.shape[-1])
    _close(dx, want_dx, dtype, "dx")
    _close(dw_parts.sum(0), want_dw, torch.float32, "dw")


@pytest.mark.parametrize(("x_dtype", "a_dtype"), [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("kind", ["rows", "strided"])
def test_add_rms_norm_ops_equal_the_reference_forward_and_backward(kc, gen, kind, x_dtype, a_dtype):
    """The residual sum h = x + a (stream x in fp32, or bf16 as under autocast by default; a branch
    output a in fp32 or bf16) and its norm in bf16; backward: the stream's gradient dh plus the norm's,
    for x in the stream's dtype and for a in a's dtype."""
    x, _ = _layout(kind, gen, kc.DEVICE, x_dtype)
    a = torch.randn(x.shape, generator=gen).to(kc.DEVICE, a_dtype)
    w = (torch.rand(x.shape[-1], generator=gen) + 0.5).to(kc.DEVICE)
    dh = torch.randn(x.shape, generator=gen).to(kc.DEVICE, x_dtype)
    dy = torch.randn(x.shape, generator=gen).to(kc.DEVICE, torch.bfloat16)
    h, y, rstd = ops.add_rms_norm(x, a, w, EPS, torch.bfloat16)
    assert h.dtype == x_dtype
    if x_dtype == torch.float32:
        assert torch.equal(h, x + a)  # the fp32 sum, as the eager add computes it
    else:  # rounded to bf16 (Triton's interpreter rounds toward zero where a GPU rounds to nearest: within one bf16 step)
        _close(h, x.double() + a.double(), torch.bfloat16, "h")
    want_y, want_dn, want_dw = _truth(h, w, dy)
    _close(y, want_y, torch.bfloat16, "y")
    _close(rstd, h.double().pow(2).mean(-1).add(EPS).rsqrt(), torch.float32, "rstd")
    dx, da, dw_parts = ops.add_rms_norm_backward(dh, dy, h, w, rstd, a_dtype)
    dw = dw_parts.sum(0)
    _close(dx, want_dn + dh.double(), x_dtype, "dx")
    _close(dw, want_dw, torch.float32, "dw")
    if a_dtype == x_dtype:
        assert da.numel() == 0  # da is dx
    else:
        _close(da, want_dn + dh.double(), torch.bfloat16, "da")


def test_the_model_norm_with_a_residual_equals_the_two_steps(kc, gen):
    """``RMSNorm(x, residual=a)`` (the FFN norm after the attention's residual add), on the kernel where
    it runs (a GPU; the interpreter through the same autograd function): h and norm(h) and the
    gradients of x, a and w, against the eager add then the reference norm in fp64."""
    norm = RMSNorm(48, EPS).to(kc.DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=gen) + 0.5)
    x = torch.randn(2, 9, 48, generator=gen).to(kc.DEVICE).requires_grad_()
    a = torch.randn(2, 9, 48, generator=gen).to(kc.DEVICE, torch.bfloat16).requires_grad_()
    dh, dy = torch.randn(2, 9, 48, generator=gen).to(kc.DEVICE), torch.randn(2, 9, 48, generator=gen).to(kc.DEVICE, torch.bfloat16)
    h, y = fused_add_rms_norm(x, a, norm.weight, EPS, torch.bfloat16)
    got = torch.autograd.grad((h, y), (x, a, norm.weight), (dh, dy))
    x64, a64, w64 = (t.detach().double().requires_grad_() for t in (x, a, norm.weight))
    h64 = x64 + a64
    y64 = rms_norm_reference(h64, w64, EPS)
    want = torch.autograd.grad((h64, y64), (x64, a64, w64), (dh.double(), dy.double()))
    _close(y, y64.detach(), torch.bfloat16, "y")
    for g, w, dtype, name in zip(got, want, (torch.float32, torch.bfloat16, torch.float32), ("dx", "da", "dw")):
        _close(g, w, dtype, name)


def test_rows_needing_four_levels_are_copied_first(kc, gen):
    """A view whose rows take four strided levels (a permuted 5-d tensor) is made contiguous, then normed."""
    x = torch.randn(2, 3, 4, 5, 16, generator=gen).to(kc.DEVICE).permute(3, 1, 0, 2, 4)
    assert row_levels(x) is None
    w, dy = torch.rand(16, generator=gen).to(kc.DEVICE), torch.randn(5, 3, 2, 4, 16, generator=gen).to(kc.DEVICE)
    y, rstd = ops.rms_norm(x, w, EPS, torch.float32)
    dx, dw_parts = ops.rms_norm_backward(dy, x, w, rstd)
    for got, want, name in zip((y, dx, dw_parts.sum(0)), _truth(x, w, dy), ("y", "dx", "dw")):
        _close(got, want, torch.float32, name)


def test_row_levels_of_the_views_the_model_norms() -> None:
    """Hand-read layouts: (N1, N2, s0, s1, s2) with row r = (i0 N1 + i1) N2 + i2 at i0 s0 + i1 s1 + i2 s2."""
    qkv = torch.empty(2, 5, 3 * 4 * 8)  # [B, S, (H + 2G) d] with H = G = 4, d = 8
    assert row_levels(qkv[..., :32]) == (1, 10, 0, 0, 96)  # the whole query projection: B and S merge into 10 rows
    assert row_levels(qkv.view(2, 5, 12, 8).transpose(1, 2)[:, :4]) == (4, 5, 480, 8, 96)  # per-head queries
    assert row_levels(torch.empty(1, 7, 1, 16)) == (1, 7, 0, 0, 16)  # size-1 dimensions drop out


def test_the_model_norm_on_the_kernel_equals_the_reference(kc, gen):
    """``fused_rms_norm`` (the model's norm on a GPU) on a per-head query view of a bf16 projection,
    bf16 out, and on the fp32 residual stream, bf16 out: forward and the gradients autograd gives."""
    qkv = torch.randn(2, 6, 3 * 4 * 16, generator=gen).to(kc.DEVICE, torch.bfloat16).requires_grad_()
    resid = torch.randn(2, 6, 64, generator=gen).to(kc.DEVICE).requires_grad_()
    for x in (qkv.view(2, 6, 12, 16).transpose(1, 2)[:, :4], resid):
        w = (torch.rand(x.shape[-1], generator=gen) + 0.5).to(kc.DEVICE).requires_grad_()
        dy = torch.randn(x.shape, generator=gen).to(kc.DEVICE, torch.bfloat16)
        y = fused_rms_norm(x, w, EPS, torch.bfloat16)
        leaf = qkv if x.dtype == torch.bfloat16 else resid
        dleaf, dw = torch.autograd.grad(y, (leaf, w), dy)
        want_y, want_dx, want_dw = _truth(x.detach(), w.detach(), dy)
        _close(y, want_y, torch.bfloat16, "y")
        got_dx = dleaf.view(2, 6, 12, 16).transpose(1, 2)[:, :4] if leaf is qkv else dleaf
        _close(got_dx, want_dx, x.dtype, "dx")
        _close(dw, want_dw, torch.float32, "dw")


def _counted(norm: RMSNorm, x: torch.Tensor, dy_dtype: torch.dtype) -> list[tuple[str, int]]:
    from tools.bench.op_counter import OpCounter

    with OpCounter() as counter:
        y = norm(x)
        assert y.dtype == dy_dtype
        torch.autograd.grad(y, (x, norm.weight), torch.empty(y.shape, dtype=dy_dtype, device="meta"))
    return [(r.name, r.bytes) for r in counter.budget.ops]


def test_the_module_on_a_card_is_one_launch_each_way_with_the_hand_counted_bytes():
    """On ``meta`` (a GPU in the step budget), under autocast: the fp32 residual [R, D] in, bf16 out,
    one kernel each way and no cast. Bytes: forward reads x (4 R D) and w (4 D), writes y (2 R D) and
    rstd (4 R); the backward reads dy (2 R D), x, w and rstd, writes dx (4 R D) and the dw partials
    (4 P D, P = min(R, 264) programs), which one sum reduces to dw (4 P D in, 4 D out). A bf16
    per-head query view in (the q/k norms) moves 2 bytes per element of x and dx instead. With a bf16
    residual a (the FFN norm): also a in (2 R D) and h out (4 R D); backward dh in (4 R D), da out (2 R D)."""
    from tools.bench.op_counter import OpCounter

    B, S, D, H, d = 2, 8, 32, 4, 8
    R = B * S
    parts = lambda rows, width: 4 * min(rows, 264) * width  # noqa: E731
    total = lambda rows, width: ("aten.sum.dim_IntList", parts(rows, width) + 4 * width)  # noqa: E731
    norm = RMSNorm(D, EPS).to("meta")
    x = torch.empty(B, S, D, device="meta", requires_grad=True)
    with meta_autocast(lambda: torch.bfloat16):
        got = _counted(norm, x, torch.bfloat16)
    assert got == [("moeforge.rms_norm.default", 4 * R * D + 4 * D + 2 * R * D + 4 * R),
                   ("moeforge.rms_norm_backward.default", 2 * R * D + 4 * R * D + 4 * D + 4 * R + 4 * R * D + parts(R, D)), total(R, D)]
    got = _counted(norm, x, torch.float32)  # autocast off: the wider of x's and w's dtypes, as before
    assert got == [("moeforge.rms_norm.default", 4 * R * D + 4 * D + 4 * R * D + 4 * R),
                   ("moeforge.rms_norm_backward.default", 4 * R * D + 4 * R * D + 4 * D + 4 * R + 4 * R * D + parts(R, D)), total(R, D)]
    qkv = torch.empty(B, S, 3 * H * d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    q = qkv.view(B, S, 3 * H, d).transpose(1, 2)[:, :H]
    with meta_autocast(lambda: torch.bfloat16):
        got = _counted(RMSNorm(d, EPS).to("meta"), q, torch.bfloat16)
    n = B * H * S
    assert got == [("moeforge.rms_norm.default", 2 * n * d + 4 * d + 2 * n * d + 4 * n),
                   ("moeforge.rms_norm_backward.default", 2 * n * d + 2 * n * d + 4 * d + 4 * n + 2 * n * d + parts(n, d)), total(n, d)]
    a = torch.empty(B, S, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with OpCounter() as counter, meta_autocast(lambda: torch.bfloat16):
        h, y = norm(x, residual=a)
        torch.autograd.grad((h, y), (x, a, norm.weight), (torch.empty_like(h), torch.empty_like(y)))
    assert [(r.name, r.bytes) for r in counter.budget.ops] == [  # x, a, w -> h, y, rstd; dh, dy, h, w, rstd -> dx, da, dw partials
        ("moeforge.add_rms_norm.default", 4 * R * D + 2 * R * D + 4 * D + 4 * R * D + 2 * R * D + 4 * R),
        ("moeforge.add_rms_norm_backward.default", 4 * R * D + 2 * R * D + 4 * R * D + 4 * D + 4 * R + 4 * R * D + 2 * R * D + parts(R, D)),
        total(R, D)]


def test_the_module_on_the_cpu_keeps_torch_rms_norm(gen, monkeypatch):
    """The CPU path is ``F.rms_norm`` in fp32 (after the plain add, with a residual), bit for bit (the
    default CPU run's numbers), and never the ops."""
    monkeypatch.setattr(ops, "rms_norm", lambda *a: pytest.fail("the CPU norm called the fused op"))
    norm = RMSNorm(24, EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=gen) + 0.5)
    x = torch.randn(3, 5, 24, generator=gen).bfloat16()
    want = torch.nn.functional.rms_norm(x.float(), (24,), norm.weight, EPS)
    assert torch.equal(norm(x), want)
    monkeypatch.setattr(ops, "add_rms_norm", lambda *a: pytest.fail("the CPU norm called the fused op"))
    a = torch.randn(3, 5, 24, generator=gen)
    h, y = norm(x, residual=a)
    assert torch.equal(h, x + a) and torch.equal(y, torch.nn.functional.rms_norm(x + a, (24,), norm.weight, EPS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_gpu_real_shapes_under_autocast(gen):
    """At the real shapes: the fp32 residual of 16,384 tokens at D = 2048 and the per-head queries of
    a [8, 2048, 3 x 16, 128] bf16 projection, through the module under CUDA autocast (bf16 out); then
    the FFN norm's form, the stream plus a bf16 branch output, normed."""
    resid = torch.randn(8, 2048, 2048, generator=gen).cuda().requires_grad_()
    qkv = torch.randn(8, 2048, 48 * 128, generator=gen).cuda().bfloat16().requires_grad_()
    for x, leaf, D in ((resid, resid, 2048), (qkv.view(8, 2048, 48, 128).transpose(1, 2)[:, :16], qkv, 128)):
        norm = RMSNorm(D, EPS).cuda()
        with torch.no_grad():
            norm.weight.copy_(torch.rand(D, generator=gen) + 0.5)
        dy = torch.randn(x.shape, generator=gen).cuda().bfloat16()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = norm(x)
        dleaf, dw = torch.autograd.grad(y, (leaf, norm.weight), dy)
        want_y, want_dx, want_dw = _truth(x.detach(), norm.weight.detach(), dy)
        _close(y, want_y, torch.bfloat16, "y")
        _close(dleaf if leaf is resid else dleaf.view(8, 2048, 48, 128).transpose(1, 2)[:, :16], want_dx, x.dtype, "dx")
        torch.testing.assert_close(dw.double(), want_dw, rtol=1e-4, atol=1e-4 * want_dw.abs().max().item())
        if D == 2048:
            norm_2048, dy_2048 = norm, dy
    a = torch.randn(resid.shape, generator=gen).cuda().bfloat16().requires_grad_()
    dh = torch.randn(resid.shape, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h, y = norm_2048(resid, residual=a)
    dx, da = torch.autograd.grad((h, y), (resid, a), (dh, dy_2048))
    want_y, want_dn, _ = _truth(resid.detach() + a.detach(), norm_2048.weight.detach(), dy_2048)
    _close(y, want_y, torch.bfloat16, "y")
    _close(dx, want_dn + dh.double(), torch.float32, "dx")
    _close(da, want_dn + dh.double(), torch.bfloat16, "da")
