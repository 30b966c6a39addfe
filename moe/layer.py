"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape letters: the ``moe`` package legend (T tokens, D model dim, F ffn dim, E experts, K slots per
token, R routed rows).

``MoELayer.runner`` is the seam ``parallel/`` replaces: a callable ``(experts, x_TD, plan) ->
y_TD`` that moves routed rows to expert weights and back. The default runs every expert locally.
Model code never knows which runner is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from moe.dispatch import DispatchPlan, dispatch
from moe.experts import Experts, ExpertsConfig, dense_swiglu
from moe.recompute import is_recomputing
from moe.routers import RouterConfig, RouterContext, build_router
from moe.routers.losses import CountSum
from moe.stats import RoutingStats

ExpertRunner = Callable[[Experts, Tensor, DispatchPlan], Tensor]


def local_runner(experts: Experts, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Run every expert on this process: the backend's whole-plan call (gather, grouped SwiGLU,
    weighted combine; fused where the backend fuses them)."""
    return experts.run_plan(x_TD, plan)


class SharedExperts(nn.Module):
    """DeepSeekMoE shared experts: ``n`` always-on SwiGLU FFNs, fused as one of width n*F.

    Added unweighted (DeepSeekMoE, Dai et al. 2024, §3.2) unless ``sigmoid_gate``: then the output
    is scaled per token by ``sigmoid(x w_D1)``, a learned scalar gate (Qwen1.5/Qwen2-MoE's
    ``shared_expert_gate``, a bias-free linear to one logit; transformers' Qwen2MoeSparseMoeBlock).
    """

    def __init__(self, num_shared: int, d_model: int, d_ff: int, sigmoid_gate: bool = False) -> None:
        super().__init__()
        width = num_shared * d_ff
        self.w_gate_DF = nn.Parameter(torch.randn(d_model, width) * d_model**-0.5)
        self.w_up_DF = nn.Parameter(torch.randn(d_model, width) * d_model**-0.5)
        self.w_down_FD = nn.Parameter(torch.randn(width, d_model) * width**-0.5)
        self.w_sigmoid_D1 = nn.Parameter(torch.randn(d_model, 1) * d_model**-0.5) if sigmoid_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = dense_swiglu(x_TD, self.w_gate_DF, self.w_up_DF, self.w_down_FD)
        if self.w_sigmoid_D1 is None:
            return y_TD
        return torch.sigmoid(x_TD @ self.w_sigmoid_D1) * y_TD


class MoELayer(nn.Module):
    """Routed SwiGLU experts with optional shared experts; records its routing statistics."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router_cfg: RouterConfig,
        experts_cfg: ExpertsConfig,
        num_shared_experts: int = 0,
        shared_expert_gate: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = experts_cfg.capacity_factor
        self.router = build_router(router_cfg, d_model, num_experts)
        self.experts = Experts(num_experts, d_model, d_ff, backend=experts_cfg.backend, options=experts_cfg.options())
        self.shared = SharedExperts(num_shared_experts, d_model, d_ff, shared_expert_gate) if num_shared_experts > 0 else None
        self.runner: ExpertRunner = local_runner
        # Installed by the parallel runtime (parallel.runtime.Runtime.install_count_sum): sums a
        # router's per-expert counts over data-parallel ranks for the global-batch balance loss.
        self.sum_counts: CountSum | None = None
        self.stats = RoutingStats(num_experts)
        # Routing-flip probe: while record_probe is set, the forward keeps the top-1 choices.
        self.record_probe = False
        self.probe_top1_T: Tensor | None = None
        self.previous_probe_top1_T: Tensor | None = None

    def forward(self, x_TD: Tensor, context: RouterContext) -> tuple[Tensor, dict[str, Tensor]]:
        if self.sum_counts is not None and self.training:  # every rank runs the same training forwards
            context = replace(context, sum_counts=self.sum_counts)
        decision = self.router(x_TD, context)
        plan = dispatch(decision, self.num_experts, self.capacity_factor)
        y_TD = self.runner(self.experts, x_TD, plan)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if is_recomputing():
            # A checkpointed forward run again records nothing. torch's default early stop ends the
            # recomputation at the experts' last saved tensor, before this line; with early stop off
            # (torch.utils.checkpoint.set_checkpoint_early_stop(False)) it runs to the end.
            pass
        elif self.training:
            self.stats.update(decision, plan)
        elif self.record_probe:
            self.previous_probe_top1_T = self.probe_top1_T
            self.probe_top1_T = decision.probs_TE.detach().argmax(dim=-1)
        return y_TD, decision.aux_losses

    @property
    def experts_per_token(self) -> int:
        """Routed experts one token uses, nominally: the router config's ``experts_per_token`` (``k``, or 1)."""
        return self.router.cfg.experts_per_token

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called by the trainer after optimizer step ``step`` (router bias updates, phase events)."""
        self.router.after_step(step, self.experts)

    def resolve_backend(self, device: torch.device) -> None:
        """Fix the experts' concrete backend once the model's device is known (``auto`` chooses)."""
        self.experts.resolve(device)
