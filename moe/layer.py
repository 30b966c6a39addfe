"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots, R routed rows.

``MoELayer.runner`` is the seam ``parallel/`` replaces: a callable ``(experts, x_TD, plan) ->
y_TD`` that moves routed rows to expert weights and back. The default runs every expert locally.
Model code never knows which runner is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moe.dispatch import DispatchPlan, combine, dispatch, gather_rows
from moe.experts import Experts, ExpertsConfig, dense_swiglu, resolve_backend
from moe.routers import RouterContext, build_router
from moe.stats import RoutingStats

ExpertRunner = Callable[[Experts, Tensor, DispatchPlan], Tensor]


def local_runner(experts: Experts, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Run every expert on this process: gather rows, grouped SwiGLU, weighted combine."""
    y_RD = experts.grouped_swiglu(gather_rows(x_TD, plan), plan.counts_E)
    return combine(y_RD, plan, x_TD.shape[0])


def fused_triton_runner(experts: Experts, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """``local_runner`` in one fused Triton pipeline: gather in the A-load, weight + combine in the epilogue."""
    from kernels.moe_experts import fused_moe_experts

    return fused_moe_experts(x_TD, plan.slot_idx_R, plan.weight_R, plan.counts_E, plan.num_slots,
                             experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD, recompute=experts.recompute, blocks=experts.blocks)


class SharedExperts(nn.Module):
    """DeepSeekMoE shared experts: ``n`` always-on SwiGLU FFNs, fused as one of width n*F."""

    def __init__(self, num_shared: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        width = num_shared * d_ff
        self.w_gate_DF = nn.Parameter(torch.randn(d_model, width) * d_model**-0.5)
        self.w_up_DF = nn.Parameter(torch.randn(d_model, width) * d_model**-0.5)
        self.w_down_FD = nn.Parameter(torch.randn(width, d_model) * width**-0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        return dense_swiglu(x_TD, self.w_gate_DF, self.w_up_DF, self.w_down_FD)


class MoELayer(nn.Module):
    """Routed SwiGLU experts with optional shared experts; records its routing statistics."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router_cfg: object,
        experts_cfg: ExpertsConfig,
        num_shared_experts: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = experts_cfg.capacity_factor
        self.router = build_router(router_cfg, d_model, num_experts)
        self.experts = Experts(num_experts, d_model, d_ff, backend=experts_cfg.backend, recompute=experts_cfg.recompute, blocks=experts_cfg.blocks())
        self.shared = SharedExperts(num_shared_experts, d_model, d_ff) if num_shared_experts > 0 else None
        self.runner: ExpertRunner = local_runner
        self.stats = RoutingStats(num_experts)
        # Routing-flip probe: while record_probe is set, the forward keeps the top-1 choices.
        self.record_probe = False
        self.probe_top1_T: Tensor | None = None
        self.previous_probe_top1_T: Tensor | None = None

    def forward(self, x_TD: Tensor, context: RouterContext) -> tuple[Tensor, dict[str, Tensor]]:
        decision = self.router(x_TD, context)
        plan = dispatch(decision, self.num_experts, self.capacity_factor)
        y_TD = self.runner(self.experts, x_TD, plan)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if self.training:
            self.stats.update(decision, plan)
        elif self.record_probe:
            self.previous_probe_top1_T = self.probe_top1_T
            self.probe_top1_T = decision.probs_TE.detach().argmax(dim=-1)
        return y_TD, decision.aux_losses

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called by the trainer after optimizer step ``step`` (router bias updates, phase events)."""
        self.router.after_step(step, self.experts)

    def resolve_backend(self, device: torch.device) -> None:
        """Turn ``auto`` into a concrete backend once the model's device is known."""
        self.experts.backend = resolve_backend(self.experts.backend, device)
        if self.experts.backend == "triton" and self.runner is local_runner:
            self.runner = fused_triton_runner
