"""Unpermute: sum each token's expert-sorted rows back into token order, by gather, without atomics.

Shape legend: T tokens, D model dim, K slots per token, S slots (T*K), R expert-sorted rows,
BT/BD the token/column blocks.

``out_TD[t] = sum_j scale[p] * (y_RD[p] + y2_RD[p])`` over ``p = pos_S[t*K + j] >= 0``: ``pos_S``
is the inverse of the dispatch permutation (the sorted row of each token-major slot, -1 for a
slot that has no row: masked or dropped). This one kernel is

- the combine of the expert outputs (forward, router weight already folded into the rows or
  given as ``scale``), and
- the backward of the row gather ``x_RD = x_TD[t_r]`` (``dx_TD = sum of dx_RD over the token's
  rows``), with ``y2`` adding the second dgrad GEMM's output in the same pass.

Where ``index_add`` scatters R rows into T with atomics (an order that changes from run to run),
each program here owns a block of output tokens and adds their K rows in slot order in fp32:
deterministic, one read of every row and one write of every token (MegaBlocks' ``[T, K, D].sum(1)``
idea without materialising the slot-major copy). Pure-torch twin: ``kernels.reference.unpermute``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kernels.swiglu_act import ELEMS_PER_PROGRAM


@triton.jit
def _unpermute_kernel(
    y_ptr, y2_ptr, pos_ptr, s_ptr, out_ptr, T, D, K, stride_y, stride_y2, stride_o,
    HAS_SECOND: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = toks < T
    col_ok = cols < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, K):
        p = tl.load(pos_ptr + toks * K + j, mask=tok_ok, other=-1).to(tl.int64)
        has_row = p >= 0
        mask = has_row[:, None] & col_ok[None, :]
        v = tl.load(y_ptr + p[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SECOND:
            v += tl.load(y2_ptr + p[:, None] * stride_y2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(s_ptr + p, mask=has_row, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + toks[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])


def unpermute_into(y_RD: Tensor, y2_RD: Tensor | None, pos_S: Tensor, K: int, s_R: Tensor | None, out_TD: Tensor) -> None:
    """Launch the kernel over ``out_TD`` (T = S/K tokens); rows need unit-stride columns."""
    T, D = out_TD.shape
    if T == 0 or D == 0:
        return
    block_d = min(1024, max(16, triton.next_power_of_2(D)))
    block_t = max(1, ELEMS_PER_PROGRAM // block_d // 2)
    _unpermute_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
        y_RD, y_RD if y2_RD is None else y2_RD, pos_S, y_RD if s_R is None else s_R, out_TD, T, D, K,
        y_RD.stride(0), y_RD.stride(0) if y2_RD is None else y2_RD.stride(0), out_TD.stride(0),
        HAS_SECOND=y2_RD is not None, HAS_SCALE=s_R is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
