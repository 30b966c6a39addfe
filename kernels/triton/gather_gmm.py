"""The bare gathered grouped GEMM: ``c[r] = a[slot_r // row_div] @ W[e_r]``.

Shape legend: R routed rows (expert-sorted), D reduction dim, N output columns, E experts;
BM/BN/BK block sizes.

Rows are gathered inside the A-tile load (``kernels.triton.tile_matmul.source_rows``) and the result is
written in expert-sorted row order. ``kernels.triton.gmm_scatter``'s backward uses it for the down
projection's dgrad; it lives apart from ``kernels.triton.swiglu_gmm`` (the fused SwiGLU kernels, which
import ``gmm_scatter``) so the two modules do not import each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import BlockSizes, TileSchedule
from kernels.triton.tile_matmul import program_tile, source_rows, tile_matmul


@triton.jit
def _plain_kernel(
    a_ptr, stride_am, stride_ak, slot_ptr, row_div,
    w_ptr, stride_we, stride_wk, stride_wn, c_ptr, stride_cm,
    tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, k_dim,
    GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    expert, rows, row_mask, pid_n, offs_n, n_mask = program_tile(tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    a_rows = source_rows(slot_ptr, rows, row_mask, row_div, GATHER)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tile_matmul(acc, a_ptr, a_rows, row_mask, stride_am, stride_ak, w_ptr + expert.to(tl.int64) * stride_we, stride_wk, stride_wn, offs_n, n_mask, k_dim, BLOCK_K, PRECISION)
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])



def gather_gmm(a_XD: Tensor, slot_idx_R: Tensor, row_div: int | None, schedule: TileSchedule, w_EDN: Tensor, blocks: BlockSizes = BlockSizes()) -> Tensor:
    """``c_RN[r] = a[slot_idx_R[r] // row_div] @ w_EDN[e_r]`` (``row_div=None``: a is already expert-sorted)."""
    R, (E, D, N) = slot_idx_R.shape[0], w_EDN.shape
    c_RN = torch.empty(R, N, dtype=a_XD.dtype, device=a_XD.device)
    _plain_kernel[blocks.gemm_grid(schedule, N)](
        a_XD, a_XD.stride(0), a_XD.stride(1), slot_idx_R, row_div or 1, w_EDN, *w_EDN.stride(), c_RN, N,
        schedule.tile_expert_N, schedule.tile_row_start_N, schedule.expert_offsets_E1, schedule.num_tiles, N, D,
        GATHER=row_div is not None, **blocks.gemm_launch(),
    )
    return c_RN
