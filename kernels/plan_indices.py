"""Dispatch's index bookkeeping after the sort, as one kernel.

Shape legend: A slots (T*K, token-major), R kept rows (the first R entries of the sort), K slots
per token, BLOCK the entries of one program.

Given ``order_A`` (the slots sorted by expert, kept ones first) and the slots' combine weights,
each entry ``i`` of the order, slot ``o = order_A[i]``, writes::

    row_of_slot_A[o] = i if i < R else -1      (the inverse permutation; -1: no row)
    token_idx_R[i]   = o // K                   (i < R)
    weight_R[i]      = weights_A[o]             (i < R)

Torch does this as an arange, a scatter, a where, a floor division and a gather (four or five
launches); here every entry is read once and each output written once. The outputs are integers
and copies, so the two agree bit for bit. Pure-torch twin: ``kernels.reference.plan_indices``;
the op lives in ``kernels.ops``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _plan_indices_kernel(order_ptr, w_ptr, row_ptr, token_ptr, wr_ptr, A, R, K, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < A
    kept = inside & (i < R)
    o = tl.load(order_ptr + i, mask=inside, other=0)
    tl.store(row_ptr + o, tl.where(i < R, i, -1).to(tl.int32), mask=inside)
    tl.store(token_ptr + i, o // K, mask=kept)
    tl.store(wr_ptr + i, tl.load(w_ptr + o, mask=kept, other=0.0), mask=kept)


def plan_indices_into(order_A: Tensor, weights_A: Tensor, K: int, num_rows: int, row_of_slot_A: Tensor, token_idx_R: Tensor, weight_R: Tensor) -> None:
    """Launch the kernel (module docstring); ``order_A`` a permutation of the A slots, every tensor contiguous."""
    A = order_A.shape[0]
    if A == 0:
        return
    _plan_indices_kernel[(triton.cdiv(A, BLOCK),)](order_A, weights_A, row_of_slot_A, token_idx_R, weight_R, A, num_rows, K, BLOCK=BLOCK, num_warps=4)
