"""Triton building blocks shared by the grouped-GEMM kernels: one M-tile of expert-sorted rows.

Shape legend: R routed rows, BM/BN/BK the tile's row, output-column and reduction block sizes.

A program of a grouped GEMM owns one tile of the schedule (``kernels.layout``): up to BM
consecutive expert-sorted rows that all belong to one expert. Its A rows are read straight
from their source (a token-major tensor indexed by ``slot // row_div``, or the expert-sorted
buffer itself), so a gathered copy of the input is never materialised (ScatterMoE,
arXiv 2403.08245 §3.1). Accumulation is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETER = tl.constexpr(triton.knobs.runtime.interpret)
"""Kernels decorated under TRITON_INTERPRET=1 (read when this module is imported, like @triton.jit)."""


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (``tl.dot``).

    Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bit patterns (its
    ``create_dot`` has no bf16 case), so interpreted kernels upcast them first; compiled kernels
    never take that branch (it is resolved at compile time).
    """
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tile_rows(tile_expert_ptr, tile_row_start_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """(expert, rows [BM] int64, row mask [BM]) of this program's tile; expert is -1 when unused."""
    tid = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tid)
    row_start = tl.load(tile_row_start_ptr + tid)
    row_end = tl.load(offsets_ptr + tl.maximum(expert, 0) + 1)
    rows = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)
    return expert, rows, rows < row_end


@triton.jit
def source_rows(slot_ptr, rows, row_mask, row_div, GATHER: tl.constexpr):
    """Row of the A source for each expert-sorted row: ``slot // row_div`` or the row itself."""
    if GATHER:
        slot = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        return slot // row_div
    else:
        return rows


@triton.jit
def tile_matmul(
    acc, a_ptr, a_rows, row_mask, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, offs_n, n_mask, k_dim,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``acc += A[a_rows, :] @ B[:, offs_n]`` over the reduction dim ``k_dim``, fp32 accumulation.

    ``b_ptr`` already points at this tile's expert; any strides work, so dgrad runs the same
    loop on a transposed weight by swapping ``stride_bk``/``stride_bn`` (no transpose copy).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * stride_am
    b_base = b_ptr + offs_n[None, :] * stride_bn
    for k0 in range(0, k_dim, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_dim
        a = tl.load(a_base + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc


@triton.jit
def tile_matmul_pair(
    acc1, acc2, a_ptr, a_rows, row_mask, stride_am, stride_ak, b1_ptr, b2_ptr, stride_bk, stride_bn, offs_n, n_mask, k_dim,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``tile_matmul`` for two weights sharing one A tile (gate and up): each A block is loaded once."""
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * stride_am
    b_off = offs_n[None, :] * stride_bn
    for k0 in range(0, k_dim, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_dim
        a = tl.load(a_base + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        b1 = tl.load(b1_ptr + b_off + k[:, None] * stride_bk, mask=b_mask, other=0.0)
        b2 = tl.load(b2_ptr + b_off + k[:, None] * stride_bk, mask=b_mask, other=0.0)
        acc1 = mma(a, b1, acc1, PRECISION)
        acc2 = mma(a, b2, acc2, PRECISION)
    return acc1, acc2
