"""Triton building blocks shared by the grouped-GEMM kernels: one M-tile of expert-sorted rows.

Shape legend: R routed rows, BM/BN/BK the tile's row, output-column and reduction block sizes.

A program of a grouped GEMM owns one tile of the schedule (``kernels.layout``): up to BM
consecutive expert-sorted rows that all belong to one expert. Its A rows are read straight
from their source (a token-major tensor indexed by ``slot // row_div``, or the expert-sorted
buffer itself), so a gathered copy of the input is never materialised (ScatterMoE,
arXiv 2403.08245 §3.1). Accumulation is fp32.

Programs are numbered in groups (``grouped_program``): ``GROUP_M`` consecutive tiles sweep all
their output-column blocks before the next group starts, so the programs resident at one time
share a few A tiles and a few weight column blocks in L2 instead of each wave streaming every
A tile again for one column block (the "grouped ordering" of Triton's matmul tutorial). Why it
matters here: with tile-major order, the up projection of the (4096, 14336, 8, 2, 8192) shape
re-reads the whole gathered input (134 MB, more than the H100's 50 MB L2) once per 128-column
block, 112 times, about 15 GB of HBM traffic for 3.9 TFLOP of work; grouped by 8 tiles, a
wave touches 8 A tiles and ~16 column blocks (about 42 MB, inside L2), about 4 GB in all (a
wave-footprint estimate, not a measurement).
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
def grouped_program(pid, num_rows_blocks, num_col_blocks, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order.

    Programs come in groups of ``GROUP_M`` row blocks x all column blocks; inside a group the row
    block varies fastest, so consecutive programs share a column block of the weight and the
    group's row blocks stay hot while its columns are swept. The last group may be narrower.
    """
    per_group = GROUP_M * num_col_blocks
    first = (pid // per_group) * GROUP_M
    height = tl.minimum(num_rows_blocks - first, GROUP_M)
    inner = pid % per_group
    return first + inner % height, inner // height


@triton.jit
def tile_rows(tid, tile_expert_ptr, tile_row_start_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """(expert, rows [BM] int64, row mask [BM]) of schedule tile ``tid``; expert is -1 when unused."""
    expert = tl.load(tile_expert_ptr + tid)
    row_start = tl.load(tile_row_start_ptr + tid)
    row_end = tl.load(offsets_ptr + tl.maximum(expert, 0) + 1)
    rows = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)
    return expert, rows, rows < row_end


@triton.jit
def program_tile(tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile and column block in grouped order (the prologue of every grouped GEMM):
    ``(expert, rows, row mask, column block, columns, column mask)``; expert is -1 for an unused tile."""
    tid, pid_n = grouped_program(tl.program_id(0), num_tiles, tl.cdiv(n_dim, BLOCK_N), GROUP_M)
    expert, rows, row_mask = tile_rows(tid, tile_expert_ptr, tile_row_start_ptr, offsets_ptr, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, row_mask, pid_n, offs_n, offs_n < n_dim


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
