"""The public fused expert block: gather -> SwiGLU experts -> weighted combine, forward and backward.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots per token,
S slots (T*K), R routed rows (expert-sorted kept slots, R <= S).

``fused_moe_experts`` equals ``moe.layer.local_runner`` (gather rows -> per-expert SwiGLU ->
combine) and takes its inputs straight from ``moe.dispatch.DispatchPlan``. Pipeline
(design: ScatterMoE, Tan et al. 2024, arXiv 2403.08245, with the paper's padded-index tiles):

forward   ``tile_schedule(counts)`` -> ``swiglu_fwd`` (x rows gathered in the A-load; saves the
          pre-activations g, u unless ``regenerate_preactivations``) -> ``gmm_scatter`` (Wd,
          router weight in the epilogue, written per slot) -> ``combine`` (fp32 sum of the K slots).
backward  ``swiglu_bwd`` (dy rows gathered, Wd^T strides; SwiGLU backward, h and the router-
          weight gradient ``dw_r = (dy_t Wd^T) . h_r`` in the epilogue) -> ``gmm_scatter`` on
          Wg^T, Wu^T + ``combine`` for dx -> ``grouped_wgrad`` for dWg, dWu (x gathered) and
          dWd (h with dy gathered, scaled by w).

Saved for backward: x, the indices, the weights and (unless ``regenerate_preactivations``) g
and u; never a gathered copy of x. Grids come from shapes only, so the path has no host synchronisation.

Importing this module raises ImportError when Triton is missing (``experts.backend=auto``
relies on it). On a CPU tensor the Triton kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` when the kernels are imported); otherwise the pure-torch reference runs.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here is the documented "no Triton" signal)
from torch import Tensor

from kernels import reference
from kernels.layout import BlockSizes, TileSchedule
from kernels.triton.combine import combine_slots
from kernels.triton.gmm_scatter import gmm_scatter_raw
from kernels.triton.grouped_wgrad import grouped_wgrad
from kernels.triton.route_meta import tile_schedule
from kernels.triton.swiglu_gmm import INTERPRETED, swiglu_bwd, swiglu_fwd


def triton_can_run(x: Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device (CUDA, or CPU under the interpreter)."""
    return x.is_cuda or (INTERPRETED and x.device.type == "cpu")


class _FusedMoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_R, w_gate_EDF, w_up_EDF, w_down_EFD, slot_idx_R, counts_E, K, blocks, regenerate_preactivations):  # type: ignore[override]
        T, R = x_TD.shape[0], slot_idx_R.shape[0]
        schedule = tile_schedule(counts_E, R, blocks.block_m)
        h_RF, g_RF, u_RF = swiglu_fwd(x_TD, slot_idx_R, schedule, K, w_gate_EDF, w_up_EDF, blocks, store_pre=not regenerate_preactivations)
        y_SD = gmm_scatter_raw(h_RF, None, w_down_EFD, None, weight_R, slot_idx_R, schedule, T * K, blocks)
        pre = () if regenerate_preactivations else (g_RF, u_RF)
        ctx.save_for_backward(x_TD, weight_R, w_gate_EDF, w_up_EDF, w_down_EFD, slot_idx_R, schedule.expert_offsets_E1, schedule.tile_expert_N, schedule.tile_row_start_N, *pre)
        ctx.K, ctx.blocks, ctx.regenerate_preactivations, ctx.block_m = K, blocks, regenerate_preactivations, schedule.block_m
        return combine_slots(y_SD, K, blocks)

    @staticmethod
    def backward(ctx, dy_TD):  # type: ignore[override]
        x_TD, weight_R, w_gate_EDF, w_up_EDF, w_down_EFD, slot_idx_R, offsets, tile_e, tile_r, *pre = ctx.saved_tensors
        K, blocks = ctx.K, ctx.blocks
        schedule = TileSchedule(offsets, tile_e, tile_r, ctx.block_m)
        if ctx.regenerate_preactivations:
            _, g_RF, u_RF = swiglu_fwd(x_TD, slot_idx_R, schedule, K, w_gate_EDF, w_up_EDF, blocks, store_h=False, store_pre=True)
        else:
            g_RF, u_RF = pre
        dy_TD = dy_TD.contiguous()
        dg_RF, du_RF, h_RF, dweight_R = swiglu_bwd(dy_TD, slot_idx_R, schedule, K, w_down_EFD, weight_R, g_RF, u_RF, blocks)
        need = ctx.needs_input_grad
        dx_TD = None
        if need[0]:
            dx_SD = gmm_scatter_raw(dg_RF, du_RF, w_gate_EDF.transpose(1, 2), w_up_EDF.transpose(1, 2), None, slot_idx_R, schedule, x_TD.shape[0] * K, blocks)
            dx_TD = combine_slots(dx_SD, K, blocks)
        wgrad = lambda a, a_div, b, b_div, scale=None: grouped_wgrad(a, a_div, b, b_div, slot_idx_R, offsets, scale, blocks=blocks)  # noqa: E731
        dwg = wgrad(x_TD, K, dg_RF, None) if need[2] else None
        dwu = wgrad(x_TD, K, du_RF, None) if need[3] else None
        dwd = wgrad(h_RF, None, dy_TD, K, weight_R) if need[4] else None
        return dx_TD, dweight_R if need[1] else None, dwg, dwu, dwd, None, None, None, None, None


def fused_moe_experts(
    x_TD: Tensor, slot_idx_R: Tensor, weight_R: Tensor, counts_E: Tensor, K: int,
    w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor,
    *, regenerate_preactivations: bool = False, blocks: BlockSizes | None = None,
) -> Tensor:
    """``y_TD[t] = sum over rows r of token t of weight_R[r] * SwiGLU_{e_r}(x_TD[t])``.

    ``slot_idx_R`` (token-major slot ids ``t*K + j``, stably sorted by expert), ``weight_R`` and
    ``counts_E`` come straight from ``moe.dispatch.DispatchPlan``; R may be below T*K (capacity
    drops, masked slots): a token then sums fewer rows. Differentiable w.r.t. ``x_TD``,
    ``weight_R`` and the three weights. ``regenerate_preactivations``: the backward computes the
    pre-activations again instead of the forward saving them (2*R*F fewer saved values; this is
    ``experts.regenerate_preactivations``, not activation checkpointing). Weights of another dtype than
    ``x_TD`` are cast to it (differentiably). Falls back to ``kernels.reference.moe_experts`` where
    Triton cannot run (see ``triton_can_run``).
    """
    T, D = x_TD.shape
    E, Dw, Fd = w_gate_EDF.shape
    assert Dw == D and w_up_EDF.shape == w_gate_EDF.shape and w_down_EFD.shape == (E, Fd, D), "weight shapes do not match x"
    assert slot_idx_R.ndim == 1 and weight_R.shape == slot_idx_R.shape and counts_E.shape == (E,), "plan shapes do not match"
    w_gate_EDF, w_up_EDF, w_down_EFD = (w.to(x_TD.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    if not triton_can_run(x_TD):
        return reference.moe_experts(x_TD, slot_idx_R, weight_R, counts_E, K, w_gate_EDF, w_up_EDF, w_down_EFD)
    blocks = blocks or BlockSizes()
    x_TD = x_TD.contiguous()
    return _FusedMoEExperts.apply(
        x_TD, weight_R.contiguous(), w_gate_EDF, w_up_EDF, w_down_EFD, slot_idx_R.contiguous(), counts_E.contiguous(), K, blocks, regenerate_preactivations,
    )


def swiglu_triton(
    x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, *, regenerate_preactivations: bool = False, blocks: BlockSizes | None = None,
) -> Tensor:
    """Drop-in for ``moe.experts.BACKENDS`` (``grouped_swiglu`` signature): rows already expert-sorted.

    Runs the fused kernels with K=1, identity slots and unit weights, so ``y_RD[r]`` is expert
    ``e_r``'s SwiGLU of ``x_RD[r]``. It cannot fuse the gather (the seam hands over gathered
    rows); ``fused_moe_experts`` through a runner does.
    """
    R = x_RD.shape[0]
    slot_idx_R = torch.arange(R, dtype=torch.int32, device=x_RD.device)
    ones_R = torch.ones(R, dtype=torch.float32, device=x_RD.device)
    return fused_moe_experts(x_RD, slot_idx_R, ones_R, counts_E, 1, w_gate_EDF, w_up_EDF, w_down_EFD, regenerate_preactivations=regenerate_preactivations, blocks=blocks)
