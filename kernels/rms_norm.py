"""RMSNorm, forward and backward, one kernel each way: fp32 or bf16 rows in, fp32 math, any out dtype.

Shape legend: R rows (every leading dimension flattened), D the normalised width, P programs of
the backward, BR rows of one block.

For each row ``x`` of width D with weight ``w`` (Zhang & Sennrich 2019, "Root Mean Square Layer
Normalization", eq. 4, without the bias)::

    forward:   r = 1 / sqrt(mean(x^2) + eps)        y = x r w
    backward:  xh = x r,  g = dy w:   dx = r (g - xh mean(g xh)),   dw = sum over rows of dy xh

(the one-line derivation: ``d(x r)/dx = r (I - xh xh^T / D)``, since ``dr/dx = -r^3 x / D``).

With a residual (``HAS_RES``; the pre-norm block's ``h = x + a`` before its FFN norm) the forward
also reads the branch output ``a``, writes the sum ``h`` (rounded to h's dtype, as the eager add) and
norms it; the backward (``HAS_DH``, ``HAS_DA``) adds the gradient ``dh`` that ``h`` receives from the
rest of the stream to the norm's ``dx`` and writes the sum for ``x`` and, in ``a``'s narrower dtype,
for ``a``: the eager add, its gradient accumulation and the downcast, folded into the norm's pass.

Torch's eager chain around a norm under autocast is an upcast of a bf16 input, the norm in fp32, an
fp32 output that the next GEMM casts to bf16, and the mirror casts in the backward. Here the
forward reads ``x`` once in its own dtype and writes ``y`` directly in the GEMM's dtype and ``r``
(one fp32 per row, for the backward); the backward reads ``dy``, ``x`` and ``r`` once and writes
``dx`` in ``x``'s dtype. ``dw`` is summed per program over the rows it visits (a bounded number of
programs, each looping over row blocks), into a ``[P, D]`` fp32 buffer that the caller reduces with
one small sum afterwards (a second launch, which the step budget counts): deterministic, no atomics,
and P = 264 (two programs per SM of an H100/H200) keeps that buffer near 2 MB at D = 2048.

The rows of ``x`` (and of ``dy``) may be any view with unit-stride columns whose leading dimensions
collapse to at most three strided levels (``row_levels``): the attention's query/key slices of the
fused projection, per head or whole, are read in place. ``y`` and ``dx`` are written contiguous.
The pure-torch twin is ``kernels.reference.rms_norm`` (and ``moe.model.rms_norm_reference``); the
ops live in ``kernels.ops``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

TILE_ELEMENTS = 4096
"""Elements of one program's [BR, D-block] tile: BR = TILE_ELEMENTS // next_pow2(D), at least 1."""
NUM_WARPS = 8
"""8 warps over a 4,096-element tile: 16 fp32 values per thread per live tile, no spills at D = 2048."""


@triton.jit
def _row_offsets(rows, N1, N2, s0, s1, s2):
    """Element offset of each row's first column: row = (i0 * N1 + i1) * N2 + i2."""
    return (rows // (N1 * N2)) * s0 + ((rows // N2) % N1) * s1 + (rows % N2) * s2


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, a_ptr, w_ptr, h_ptr, y_ptr, rstd_ptr, R, D, N1, N2, sx0, sx1, sx2, eps,
                         HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    src = _row_offsets(rows, N1, N2, sx0, sx1, sx2)
    dst = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # h = x + a, rounded to h's dtype as the eager add is, then normed
        h = (x + tl.load(a_ptr + dst, mask=mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + dst, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dh_ptr, dx_ptr, da_ptr, dw_part_ptr, R, D, N1, N2, sx0, sx1, sx2, M1, M2, sd0, sd1, sd2,
                         HAS_DH: tl.constexpr, HAS_DA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        rows = tl.arange(0, BLOCK_R).to(tl.int64) + start
        row_ok = rows < R
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + _row_offsets(rows, N1, N2, sx0, sx1, sx2)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + _row_offsets(rows, M1, M2, sd0, sd1, sd2)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xh = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xh, axis=1) / D
        dx = (g - xh * c[:, None]) * rstd[:, None]
        dst = rows[:, None] * D + cols[None, :]
        if HAS_DH:  # the gradient reaching h = x + a from elsewhere (the residual stream) joins the norm's
            dx += tl.load(dh_ptr + dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + dst, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DA:  # the same gradient for a, in a's (narrower) dtype
            tl.store(da_ptr + dst, dx.to(da_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xh, axis=0)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=col_ok)


Levels = tuple[int, int, int, int, int]
"""(N1, N2, s0, s1, s2): row r = (i0 * N1 + i1) * N2 + i2 starts at element i0 s0 + i1 s1 + i2 s2."""


def row_levels(t: Tensor) -> Levels | None:
    """How the rows of ``t`` (leading dimensions, unit-stride last one) are laid out, in at most
    three strided levels after merging dimensions that are contiguous with each other; None when
    more levels remain (the caller makes ``t`` contiguous)."""
    merged: list[tuple[int, int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 3:
        return None
    (_, s0), (n1, s1), (n2, s2) = [(1, 0)] * (3 - len(merged)) + merged
    return n1, n2, s0, s1, s2


def _block_rows(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, TILE_ELEMENTS // block_d), block_d


def rms_norm_fwd_into(x: Tensor, lx: Levels, weight_D: Tensor, eps: float, y: Tensor, rstd_R: Tensor,
                      a: Tensor | None = None, h: Tensor | None = None) -> None:
    """``y`` (contiguous, any float dtype) and ``rstd_R`` (fp32) of the rows of ``x`` laid out as ``lx``;
    with ``a`` and ``h`` (contiguous), of ``h = x + a`` instead, ``h`` written too."""
    D = x.shape[-1]
    R = rstd_R.numel()
    if R == 0:
        return
    block_r, block_d = _block_rows(D)
    _rms_norm_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, y if a is None else a, weight_D, y if h is None else h, y, rstd_R, R, D, *lx, eps,
        HAS_RES=a is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )


def rms_norm_bwd_into(dy: Tensor, ldy: Levels, x: Tensor, lx: Levels, weight_D: Tensor, rstd_R: Tensor, dx: Tensor, dw_part_PD: Tensor,
                      dh: Tensor | None = None, da: Tensor | None = None) -> None:
    """``dx`` (contiguous, x's dtype) and each program's fp32 ``dw`` partial sum (row p of
    ``dw_part_PD``; P = ``dw_part_PD.shape[0]`` programs, ``kernels.ops.rms_norm_dw_programs``). With ``dh``
    (contiguous) it is added to ``dx``; with ``da`` (contiguous) ``dx`` is also written there, in its dtype."""
    R, D = rstd_R.numel(), x.shape[-1]
    block_r, block_d = _block_rows(D)
    _rms_norm_bwd_kernel[(dw_part_PD.shape[0],)](
        dy, x, weight_D, rstd_R, dx if dh is None else dh, dx, dx if da is None else da, dw_part_PD, R, D, *lx, *ldy,
        HAS_DH=dh is not None, HAS_DA=da is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
