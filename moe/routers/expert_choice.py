"""Expert-choice routing (Zhou et al., NeurIPS 2022). NON-CAUSAL.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts, K
slots, C tokens per expert.

*Mixture-of-Experts with Expert Choice Routing* (arXiv 2202.09368) §3.1, as in
``google/flaxformer: flaxformer/architectures/moe/routing.py`` (``ExpertsChooseMaskedRouter``):
token-to-expert affinities ``S = softmax(h)`` (eq. 1, softmax over experts), and each expert
takes its ``C = ceil(T · c / E)`` highest-affinity tokens of the group (``c`` =
``capacity_factor``, 2 in the paper). Loads are perfectly balanced (every expert processes
exactly C tokens) and no auxiliary loss is needed; a token gets 0..E experts with weight
``S_te`` each, and a token no expert picks gets zero output from the layer (the residual carries
it; statistics count it as 0 experts per token).

NON-CAUSAL: which experts see token t depends on every other token of the batch, later ones
included, so the router leaks future information in a decoder and cannot be used for
autoregressive generation. ``causal`` exists to make that explicit: asking for a causal expert
choice router is refused.

The decision has K = E slots (slot e = expert e) and ``mask_TK`` marks the chosen ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.routers.gate import gate_logits, normal_gate
from moe.routers.interface import Router, RouterConfig, RouterContext, RoutingDecision


@dataclass(kw_only=True)
class ExpertChoiceConfig(RouterConfig):
    """Counted as one expert per token (``experts_per_token``), though tokens use ``capacity_factor`` on average."""

    name: str = "expert_choice"
    capacity_factor: float = 2.0
    """c: each expert takes C = ceil(T * c / E) tokens, i.e. c experts per token on average (paper: 2)."""
    causal: bool = False
    """Expert choice is NON-CAUSAL (a token's routing depends on later tokens); true is refused."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.capacity_factor > 0, "router.capacity_factor", self.capacity_factor, "must be > 0")
        check(
            not self.causal,
            "router.causal",
            self.causal,
            "cannot be true: expert choice routing is non-causal (each expert ranks all tokens, later ones included)",
        )


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(T * c / E)`` (Zhou et al. eq. 1's k), at most T."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


class ExpertChoiceRouter(Router):
    """Each expert picks its top-C tokens by softmax affinity (Zhou et al. 2022)."""

    Config = ExpertChoiceConfig
    per_token = False  # each expert picks among all tokens of the forward
    cfg: ExpertChoiceConfig

    def __init__(self, cfg: ExpertChoiceConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        self.gate = normal_gate(d_model, num_experts)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        probs_TE = torch.softmax(gate_logits(x_TD, self.gate.weight), dim=-1)
        C = expert_capacity(T, E, self.cfg.capacity_factor)
        tokens_CE = torch.topk(probs_TE.detach(), C, dim=0).indices
        mask_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device).scatter_(0, tokens_CE, True)
        return RoutingDecision(
            expert_ids_TK=torch.arange(E, device=x_TD.device).expand(T, E).contiguous(),
            weights_TK=probs_TE * mask_TE,
            probs_TE=probs_TE,
            mask_TK=mask_TE,
            extras={"capacity": float(C)},
        )
