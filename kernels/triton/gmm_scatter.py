"""Grouped GEMM over expert-sorted rows that writes each result to its slot (down projection).

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots per token,
S slots (T*K), R routed rows (expert-sorted), N tiles; BM/BN/BK block sizes.

``_gmm_scatter_kernel`` computes, for the rows of one schedule tile (one expert e),
``y_SD[slot_r] = scale_r * (a1[r] @ B1[e] + a2[r] @ B2[e])`` with the second pair and the
scale optional. Forward: ``a1 = h``, ``B1 = Wd``, scale = router weight (the MegaBlocks /
ScatterMoE "scatter" epilogue). Backward: the input gradient of the up projection is the
same kernel on transposed strides, ``dx_slot = dg Wg^T + du Wu^T``. ``kernels.triton.combine`` then sums
the K slots of each token without atomics. Slots that have no row (dropped by capacity or
masked) must read 0, so the output is zero-filled when R < S (a shape test, no sync).

``gmm_scatter`` is the differentiable per-op entry (h, router weight, Wd -> y_SD).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import BlockSizes, TileSchedule
from kernels.triton.gather_gmm import gather_gmm
from kernels.triton.grouped_wgrad import grouped_wgrad
from kernels.triton.tile_matmul import program_tile, tile_matmul


@triton.jit
def _gmm_scatter_kernel(
    a1_ptr, a2_ptr, stride_am, stride_ak,
    b1_ptr, b2_ptr, stride_be, stride_bk, stride_bn,
    scale_ptr, slot_ptr, y_ptr, stride_ym,
    tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, k_dim,
    HAS_SECOND: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    expert, rows, row_mask, pid_n, offs_n, n_mask = program_tile(tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    b_off = expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tile_matmul(acc, a1_ptr, rows, row_mask, stride_am, stride_ak, b1_ptr + b_off, stride_bk, stride_bn, offs_n, n_mask, k_dim, BLOCK_K, PRECISION)
    if HAS_SECOND:
        acc = tile_matmul(acc, a2_ptr, rows, row_mask, stride_am, stride_ak, b2_ptr + b_off, stride_bk, stride_bn, offs_n, n_mask, k_dim, BLOCK_K, PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    slot = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tl.store(y_ptr + slot[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def gmm_scatter_raw(
    a1_RK: Tensor, a2_RK: Tensor | None, b1_EKN: Tensor, b2_EKN: Tensor | None, scale_R: Tensor | None,
    slot_idx_R: Tensor, schedule: TileSchedule, num_slots: int, blocks: BlockSizes,
) -> Tensor:
    """Launch ``y_SN[slot_r] = scale_r * (a1[r] @ b1[e_r] + a2[r] @ b2[e_r])``; rows of ``a`` are expert-sorted."""
    R, (E, Kd, N) = slot_idx_R.shape[0], b1_EKN.shape
    a2, b2 = (a1_RK, b1_EKN) if a2_RK is None else (a2_RK, b2_EKN)
    assert a1_RK.stride() == a2.stride() and b1_EKN.stride() == b2.stride(), "paired operands must share a layout"
    alloc = torch.empty if R == num_slots else torch.zeros
    y_SN = alloc(num_slots, N, dtype=a1_RK.dtype, device=a1_RK.device)
    _gmm_scatter_kernel[blocks.gemm_grid(schedule, N)](
        a1_RK, a2, a1_RK.stride(0), a1_RK.stride(1),
        b1_EKN, b2, *b1_EKN.stride(),
        a1_RK if scale_R is None else scale_R, slot_idx_R, y_SN, y_SN.stride(0),
        schedule.tile_expert_N, schedule.tile_row_start_N, schedule.expert_offsets_E1, schedule.num_tiles, N, Kd,
        HAS_SECOND=a2_RK is not None, HAS_SCALE=scale_R is not None, **blocks.gemm_launch(),
    )
    return y_SN


class _GmmScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_RF, weight_R, slot_idx_R, schedule, w_down_EFD, num_slots, blocks):  # type: ignore[override]
        ctx.save_for_backward(h_RF, weight_R, slot_idx_R, w_down_EFD)
        ctx.schedule, ctx.blocks = schedule, blocks
        return gmm_scatter_raw(h_RF, None, w_down_EFD, None, weight_R, slot_idx_R, schedule, num_slots, blocks)

    @staticmethod
    def backward(ctx, dy_SD):  # type: ignore[override]
        h_RF, weight_R, slot_idx_R, w_down_EFD = ctx.saved_tensors
        schedule, blocks = ctx.schedule, ctx.blocks
        dy_SD = dy_SD.contiguous()
        # a = dy[slot_r] Wd[e]^T (unscaled): dh = w a, dw_r = a . h (row dot products).
        a_RF = gather_gmm(dy_SD, slot_idx_R, 1, schedule, w_down_EFD.transpose(1, 2), blocks)
        dh_RF = (a_RF.float() * weight_R.float()[:, None]).to(h_RF.dtype)
        dweight_R = (a_RF.float() * h_RF.float()).sum(-1).to(weight_R.dtype)
        dwd = grouped_wgrad(h_RF, None, dy_SD, 1, slot_idx_R, schedule.expert_offsets_E1, weight_R, blocks=blocks)
        return dh_RF, dweight_R, None, None, dwd, None, None


def gmm_scatter(
    h_RF: Tensor, weight_R: Tensor, slot_idx_R: Tensor, schedule: TileSchedule, w_down_EFD: Tensor, num_slots: int, *, blocks: BlockSizes | None = None,
) -> Tensor:
    """Differentiable ``y_SD[slot_idx_R[r]] = weight_R[r] * (h_RF[r] @ Wd[e_r])``; slots without a row are 0."""
    blocks = blocks or BlockSizes(block_m=schedule.block_m)
    return _GmmScatter.apply(h_RF, weight_R, slot_idx_R, schedule, w_down_EFD, num_slots, blocks)
