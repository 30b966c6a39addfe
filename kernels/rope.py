"""Rotary position embedding, forward and backward, as one kernel: bf16 in and out, fp32 math.

Shape legend: B batch, H heads, S positions, d head dim (even), BR the rows of one program.

For each row ``x`` (one head at one position ``s``) with halves ``x1, x2`` (Su et al. 2021,
"RoFormer", eq. 34, the half-split pairing)::

    forward:   y1 = x1 cos_s - x2 sin_s      y2 = x1 sin_s + x2 cos_s
    backward:  the rotation by -angle (its transpose): the same kernel with sin negated

Torch needs four to six kernels for this (an upcast, the multiply, the flip, the fused
multiply-add, the downcast; twice as many with the ``cat`` of the textbook form); here each
element is read once and written once. The input may be any strided view with unit-stride rows
(the query and key heads are views of the fused projection); the output takes the input's
dimension order (``torch.empty_like``), as torch's chain does, so attention's output keeps the
[B, S, H, d] layout its projection reads without a copy. The
pure-torch twin is ``moe.model.apply_rope_reference``; the op lives in ``kernels.ops``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

ROWS_PER_PROGRAM = 16


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, R, H, S, stride_b, stride_h, stride_s, out_b, out_h, out_s, stride_cs, sign,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < HALF)[None, :]
    s = rows % S
    bh = rows // S
    src = x_ptr + (bh // H) * stride_b + (bh % H) * stride_h + s * stride_s
    x1 = tl.load(src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + s[:, None] * stride_cs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + s[:, None] * stride_cs + cols[None, :], mask=mask, other=0.0).to(tl.float32) * sign
    dst = y_ptr + ((bh // H) * out_b + (bh % H) * out_h + s * out_s)[:, None] + cols[None, :]
    tl.store(dst, (x1 * c - x2 * sn).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x1 * sn + x2 * c).to(y_ptr.dtype.element_ty), mask=mask)


def rope_into(x_BHSd: Tensor, cos_Sh: Tensor, sin_Sh: Tensor, inverse: bool, y_BHSd: Tensor) -> None:
    """Launch the kernel: ``y`` (any strides, unit-stride rows) = ``x`` rotated by each position's angle, or by its
    negative when ``inverse`` (the backward). ``x`` has unit-stride rows; cos/sin are [S, d/2]
    with unit-stride rows and the same row stride."""
    B, H, S, d = x_BHSd.shape
    R = B * H * S
    if R == 0:
        return
    half = d // 2
    _rope_kernel[(triton.cdiv(R, ROWS_PER_PROGRAM),)](
        x_BHSd, cos_Sh, sin_Sh, y_BHSd, R, H, S, x_BHSd.stride(0), x_BHSd.stride(1), x_BHSd.stride(2),
        y_BHSd.stride(0), y_BHSd.stride(1), y_BHSd.stride(2), cos_Sh.stride(0),
        -1.0 if inverse else 1.0, HALF=half, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(half), num_warps=4,
    )
