"""``experts.backend=triton``: moeforge's fused Triton grouped-GEMM kernels (``kernels.triton.moe_experts``).

Shape letters: the ``moe`` package legend (T tokens, R expert-sorted rows, D model dim, F expert
ffn dim, E experts).

The whole-plan call fuses the row gather into the first GEMM's A-load and the router weight +
combine into the down projection's epilogue (ScatterMoE's design, Tan et al. 2024,
arXiv 2403.08245); the grouped call (EP/FSSDP, rows already gathered) runs the same kernels with
one slot per row. Honours ``experts.regenerate_preactivations`` and ``experts.kernel_blocks``.
Needs Triton and a CUDA device (or the CPU under ``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.expert_backends.base import ExpertBackend, ExpertOptions


class TritonFusedBackend(ExpertBackend):
    name = "triton"
    honours = frozenset({"regenerate_preactivations", "kernel_blocks"})

    def reads_counts_on_host(self, device: torch.device) -> bool:
        """The kernels read the expert offsets on the device."""
        return False

    def unavailable(self, device: torch.device) -> str | None:
        try:
            from kernels.triton.moe_experts import INTERPRETED
        except ImportError:
            return "needs the triton package (pip install triton)"
        if device.type != "cuda" and not (INTERPRETED and device.type == "cpu"):
            return "needs a CUDA device; use torch or grouped_mm"
        return None

    def grouped(self, x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        from kernels.triton.moe_experts import swiglu_triton

        return swiglu_triton(x_RD, counts_E, w_gate_EDF, w_up_EDF, w_down_EFD, regenerate_preactivations=options.regenerate_preactivations, blocks=options.blocks)

    def run_plan(self, x_TD: Tensor, plan: object, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        from kernels.triton.moe_experts import fused_moe_experts

        return fused_moe_experts(
            x_TD, plan.slot_idx_R, plan.weight_R, plan.counts_E, plan.slots_per_token, w_gate_EDF, w_up_EDF, w_down_EFD,
            regenerate_preactivations=options.regenerate_preactivations, blocks=options.blocks,
        )
