"""Gathered grouped GEMM (up projection) with fused SwiGLU epilogues, forward and dgrad.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots per token,
S slots (T*K), R routed rows (expert-sorted), N tiles; BM/BN/BK block sizes.

Two kernels share the K-loop of ``kernels.triton.tile_matmul`` (gate and up read each A block once) and grid ``(tiles, cdiv(N_out, BN))``;
rows are gathered inside the A-tile load, results are written in expert-sorted row order:

- ``_swiglu_fwd_kernel``: ``g = x[t_r] Wg[e]``, ``u = x[t_r] Wu[e]``, ``h = silu(g) * u``
  (SwiGLU, Shazeer 2020 "GLU Variants Improve Transformer", eq. 6); optionally stores g and u
  (the pre-activations the backward needs, unless it recomputes them).
- ``_swiglu_bwd_kernel``: the down projection's dgrad on ``Wd[e]^T`` (transposed strides)
  fused with the SwiGLU backward and the router-weight gradient: with
  ``a = dy[t_r] Wd[e]^T`` and router weight ``w_r``:
  ``dh = w_r a``, ``du = dh silu(g)``, ``dg = dh u sigmoid(g)(1 + g(1 - sigmoid(g)))`` and
  ``dw_r = a . h`` (since ``y_t = sum_r w_r h_r Wd[e]``), summed per column block into
  ``dw_partial[n_block, r]`` and reduced by the caller in a fixed order (no atomics).

``gather_gmm_swiglu`` is the differentiable per-op entry (x, Wg, Wu -> h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import BlockSizes, TileSchedule
from kernels.triton.combine import combine_slots
from kernels.triton.gmm_scatter import gmm_scatter_raw
from kernels.triton.grouped_wgrad import grouped_wgrad
from kernels.triton.tile_matmul import program_tile, source_rows, tile_matmul, tile_matmul_pair


@triton.jit
def _swiglu_fwd_kernel(
    x_ptr, stride_xm, stride_xk, slot_ptr, row_div,
    wg_ptr, wu_ptr, stride_we, stride_wk, stride_wn,
    h_ptr, g_ptr, u_ptr, stride_hm,
    tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, k_dim,
    STORE_H: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    expert, rows, row_mask, pid_n, offs_n, n_mask = program_tile(tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    a_rows = source_rows(slot_ptr, rows, row_mask, row_div, True)
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_off = expert.to(tl.int64) * stride_we
    g, u = tile_matmul_pair(
        zero, zero, x_ptr, a_rows, row_mask, stride_xm, stride_xk, wg_ptr + w_off, wu_ptr + w_off, stride_wk, stride_wn, offs_n, n_mask, k_dim, BLOCK_K, PRECISION,
    )
    out = rows[:, None] * stride_hm + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    if STORE_PRE:
        tl.store(g_ptr + out, g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + out, u.to(u_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        # Round g and u to the storage dtype first so h matches what the backward recomputes.
        g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
        u = u.to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + out, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, stride_dym, stride_dyk, slot_ptr, row_div,
    wd_ptr, stride_we, stride_wk, stride_wn, weight_ptr,
    g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, stride_m, dw_ptr, num_rows,
    tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, k_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    expert, rows, row_mask, pid_n, offs_n, n_mask = program_tile(tile_expert_ptr, tile_row_start_ptr, offsets_ptr, num_tiles, n_dim, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    a_rows = source_rows(slot_ptr, rows, row_mask, row_div, True)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a = tile_matmul(acc, dy_ptr, a_rows, row_mask, stride_dym, stride_dyk, wd_ptr + expert.to(tl.int64) * stride_we, stride_wk, stride_wn, offs_n, n_mask, k_dim, BLOCK_K, PRECISION)
    out = rows[:, None] * stride_m + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    g = tl.load(g_ptr + out, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + out, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    h = (silu * u).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + out, h, mask=mask)
    tl.store(dw_ptr + pid_n * num_rows + rows, tl.sum(a * h.to(tl.float32), axis=1), mask=row_mask)
    dh = a * w[:, None]
    tl.store(du_ptr + out, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + out, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


try:
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_swiglu_fwd_kernel, InterpretedFunction)
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
except ImportError:  # pragma: no cover - interpreter moved in a future Triton
    INTERPRETED = False


def swiglu_fwd(
    x_TD: Tensor, slot_idx_R: Tensor, schedule: TileSchedule, K: int, w_gate_EDF: Tensor, w_up_EDF: Tensor, blocks: BlockSizes,
    *, store_h: bool = True, store_pre: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Launch the up projection; returns ``(h_RF, g_RF, u_RF)`` with None for what was not stored."""
    assert w_gate_EDF.stride() == w_up_EDF.stride(), "gate and up weights must share a layout"
    R, (E, D, Fd) = slot_idx_R.shape[0], w_gate_EDF.shape
    new = lambda on: torch.empty(R, Fd, dtype=x_TD.dtype, device=x_TD.device) if on else None  # noqa: E731
    h_RF, g_RF, u_RF = new(store_h), new(store_pre), new(store_pre)
    dummy = h_RF if h_RF is not None else g_RF
    _swiglu_fwd_kernel[blocks.gemm_grid(schedule, Fd)](
        x_TD, x_TD.stride(0), x_TD.stride(1), slot_idx_R, K,
        w_gate_EDF, w_up_EDF, *w_gate_EDF.stride(),
        dummy if h_RF is None else h_RF, dummy if g_RF is None else g_RF, dummy if u_RF is None else u_RF, Fd,
        schedule.tile_expert_N, schedule.tile_row_start_N, schedule.expert_offsets_E1, schedule.num_tiles, Fd, D,
        STORE_H=store_h, STORE_PRE=store_pre, **blocks.gemm_launch(),
    )
    return h_RF, g_RF, u_RF


def swiglu_bwd(
    dy_TD: Tensor, slot_idx_R: Tensor, schedule: TileSchedule, K: int, w_down_EFD: Tensor, weight_R: Tensor, g_RF: Tensor, u_RF: Tensor, blocks: BlockSizes,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Down-projection dgrad fused with the SwiGLU backward: ``(dg_RF, du_RF, h_RF, dweight_R)``."""
    R, Fd, D = slot_idx_R.shape[0], w_down_EFD.shape[1], w_down_EFD.shape[2]
    dg_RF, du_RF, h_RF = torch.empty_like(g_RF), torch.empty_like(u_RF), torch.empty_like(g_RF)
    block_n = blocks.swiglu_bwd_block_n
    dw_partial = torch.empty(triton.cdiv(Fd, block_n), R, dtype=torch.float32, device=dy_TD.device)
    s_e, s_f, s_d = w_down_EFD.stride()
    _swiglu_bwd_kernel[blocks.gemm_grid(schedule, Fd, block_n)](
        dy_TD, dy_TD.stride(0), dy_TD.stride(1), slot_idx_R, K,
        w_down_EFD, s_e, s_d, s_f, weight_R,  # Wd[e]^T: reduce over D, output columns F
        g_RF, u_RF, dg_RF, du_RF, h_RF, Fd, dw_partial, R,
        schedule.tile_expert_N, schedule.tile_row_start_N, schedule.expert_offsets_E1, schedule.num_tiles, Fd, D,
        **blocks.gemm_launch(block_n),
    )
    return dg_RF, du_RF, h_RF, dw_partial.sum(0).to(weight_R.dtype)


class _GatherGmmSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, slot_idx_R, schedule, K, w_gate_EDF, w_up_EDF, blocks):  # type: ignore[override]
        h_RF, g_RF, u_RF = swiglu_fwd(x_TD, slot_idx_R, schedule, K, w_gate_EDF, w_up_EDF, blocks, store_pre=True)
        ctx.save_for_backward(x_TD, slot_idx_R, w_gate_EDF, w_up_EDF, g_RF, u_RF)
        ctx.schedule, ctx.K, ctx.blocks = schedule, K, blocks
        return h_RF

    @staticmethod
    def backward(ctx, dh_RF):  # type: ignore[override]
        x_TD, slot_idx_R, w_gate_EDF, w_up_EDF, g_RF, u_RF = ctx.saved_tensors
        schedule, K, blocks = ctx.schedule, ctx.K, ctx.blocks
        g, u, dh = g_RF.float(), u_RF.float(), dh_RF.float()
        sig = torch.sigmoid(g)
        du_RF = (dh * g * sig).to(u_RF.dtype)
        dg_RF = (dh * u * sig * (1 + g * (1 - sig))).to(g_RF.dtype)
        dx_TD = combine_slots(
            gmm_scatter_raw(dg_RF, du_RF, w_gate_EDF.transpose(1, 2), w_up_EDF.transpose(1, 2), None, slot_idx_R, schedule, x_TD.shape[0] * K, blocks), K, blocks,
        )
        offsets = schedule.expert_offsets_E1
        dwg = grouped_wgrad(x_TD, K, dg_RF, None, slot_idx_R, offsets, blocks=blocks)
        dwu = grouped_wgrad(x_TD, K, du_RF, None, slot_idx_R, offsets, blocks=blocks)
        return dx_TD, None, None, None, dwg, dwu, None


def gather_gmm_swiglu(
    x_TD: Tensor, slot_idx_R: Tensor, schedule: TileSchedule, K: int, w_gate_EDF: Tensor, w_up_EDF: Tensor, *, blocks: BlockSizes | None = None,
) -> Tensor:
    """Differentiable ``h_RF = silu(x[t_r] Wg[e_r]) * (x[t_r] Wu[e_r])``, ``t_r = slot_idx_R[r] // K``."""
    blocks = blocks or BlockSizes(block_m=schedule.block_m)
    return _GatherGmmSwiGLU.apply(x_TD, slot_idx_R, schedule, K, w_gate_EDF, w_up_EDF, blocks)
