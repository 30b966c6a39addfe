"""The SwiGLU activation between grouped GEMMs, with the router weight folded in: one pass each way.

Shape legend: R expert-sorted rows, F expert ffn dim, BR/BF the row/column blocks.

Forward ``h_RF = s_r * silu(g_RF) * u_RF`` (Shazeer 2020, SwiGLU; ``s_R`` is the router weight
of each row, or absent). Folding ``s`` into ``h`` makes the down projection's output already
weighted, so the combine is a plain sum (the ScatterMoE ordering, Tan et al. 2024,
arXiv 2403.08245 §3.2). Backward, with ``a = dL/dh`` and ``silu'(g) = sig(g)(1 + g(1 - sig(g)))``::

    du = a * s * silu(g)        dg = a * s * u * silu'(g)        ds_r = sum_f a_rf silu(g_rf) u_rf

Both kernels read each operand once and write each result once in the operands' dtype, with fp32
arithmetic: 3 R*F element passes forward, 5 backward (plus the row scale). The backward walks a
block of rows across F so the row sum ``ds`` needs no atomics and is deterministic. Pure-torch
twins: ``kernels.reference.swiglu_act`` (and autograd through it); the device choice lives in
``kernels.ops``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

ELEMS_PER_PROGRAM = 4096
"""Elements of one operand tile per program: 8 KB of bf16, 32 per thread at 4 warps (16-byte loads)."""


def _blocks(num_cols: int) -> tuple[int, int]:
    """(rows, columns) of a tile: columns a power of two up to 512, rows fill ELEMS_PER_PROGRAM."""
    block_f = min(512, max(16, triton.next_power_of_2(num_cols)))
    return max(1, ELEMS_PER_PROGRAM // block_f), block_f


@triton.jit
def _swiglu_act_fwd_kernel(g_ptr, u_ptr, s_ptr, h_ptr, R, F, stride_g, stride_u, stride_h, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < F)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    if HAS_SCALE:
        h = h * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_act_bwd_kernel(
    g_ptr, u_ptr, a_ptr, s_ptr, dg_ptr, du_ptr, ds_ptr, R, F, stride_g, stride_u, stride_a, stride_dg, stride_du,
    HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    if HAS_SCALE:
        s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    ds = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_ok[:, None] & (cols < F)[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        if HAS_SCALE:
            ds += tl.sum(a * silu * u, axis=1)
            a = a * s
        tl.store(du_ptr + rows[:, None] * stride_du + cols[None, :], (a * silu).to(du_ptr.dtype.element_ty), mask=mask)
        dg = a * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + rows[:, None] * stride_dg + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        tl.store(ds_ptr + rows, ds.to(ds_ptr.dtype.element_ty), mask=row_ok)


def swiglu_act_fwd_into(g_RF: Tensor, u_RF: Tensor, s_R: Tensor | None, h_RF: Tensor) -> None:
    """Launch the forward kernel: ``h_RF = s_R * silu(g_RF) * u_RF`` (unit-stride columns)."""
    R, F = g_RF.shape
    if R == 0 or F == 0:
        return
    block_r, block_f = _blocks(F)
    _swiglu_act_fwd_kernel[(triton.cdiv(R, block_r), triton.cdiv(F, block_f))](
        g_RF, u_RF, g_RF if s_R is None else s_R, h_RF, R, F, g_RF.stride(0), u_RF.stride(0), h_RF.stride(0),
        HAS_SCALE=s_R is not None, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4,
    )


def swiglu_act_bwd_into(g_RF: Tensor, u_RF: Tensor, a_RF: Tensor, s_R: Tensor | None, dg_RF: Tensor, du_RF: Tensor, ds_R: Tensor) -> None:
    """Launch the backward kernel: ``dg``, ``du`` from ``a = dL/dh``, and the row sums ``ds_R`` when scaled."""
    R, F = g_RF.shape
    if R == 0 or F == 0:
        if s_R is not None:
            ds_R.zero_()
        return
    block_r, block_f = _blocks(F)
    block_r = max(1, block_r // 2)  # three operands in flight per iteration instead of two
    _swiglu_act_bwd_kernel[(triton.cdiv(R, block_r),)](
        g_RF, u_RF, a_RF, g_RF if s_R is None else s_R, dg_RF, du_RF, ds_R, R, F,
        g_RF.stride(0), u_RF.stride(0), a_RF.stride(0), dg_RF.stride(0), du_RF.stride(0),
        HAS_SCALE=s_R is not None, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4,
    )
