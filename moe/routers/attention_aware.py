"""Attention-aware routing (Nguyen, Tran, Nguyen, Baraniuk 2025, arXiv 2505.00792 §3).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T = B*S tokens, E experts, K slots, B
batch, S sequence.

Similarity-aware routing (``moe.routers.similarity``) with the token graph taken from the model
instead of learned: ``pi~ = A pi``, where ``A`` is the head-averaged attention probabilities of
the preceding attention sublayer in the same block (``RouterContext.attn_probs_BSS``, causal
already) and ``pi = softmax(x W_g)`` is computed on the MoE layer's input. No parameters beyond
the gate. The router sets ``needs_attention`` so the model computes and passes ``A``.

Masking: ``A`` is multiplied by the causal mask (a no-op for the model's causal attention, a
guard against non-causal probabilities) and, when ``RouterContext.doc_ids_T`` is given, by the
same-document mask (the model's attention crosses packed-document boundaries, routing should
not), then each row is renormalised; the diagonal of a softmax is positive, so no row is empty.
Like similarity routing this is a reconstruction of the paper's model; the mixing space and
the load-balancing loss (Switch on ``pi~``, ⚠ assumed) are config values. No public code exists
(searched: see ``moe.routers.similarity``); defaults are those of the similarity router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.routers.gate import gate_logits, normal_gate
from moe.routers.interface import KRouterConfig, Router, RouterContext, RoutingDecision
from moe.routers.losses import check_balance_scope, scope_count_sum
from moe.routers.similarity import MIX_SPACES, graph_mixed_decision, sequence_mask, token_layout


@dataclass(kw_only=True)
class AttentionAwareConfig(KRouterConfig):
    name: str = "attention_aware"
    mix: str = "probs"
    """What the attention averages: probs (pi~ = A softmax(h), the paper's model) or logits (softmax(A h))."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch load-balancing loss, computed on the mixed distribution."""
    z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss on the unmixed logits h."""
    balance_scope: str = "global"
    """Which tokens the balance loss's f counts: global (every data-parallel rank's) | micro_batch
    (this rank's); see router.balance_scope of topk."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.mix in MIX_SPACES, "router.mix", self.mix, f"must be one of {list(MIX_SPACES)}")
        check(self.aux_loss_coef >= 0, "router.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, "router.z_loss_coef", self.z_loss_coef, "must be >= 0")
        check_balance_scope(self.balance_scope)


class AttentionAwareRouter(Router):
    """Linear gate mixed over the preceding attention's probabilities, then top-k."""

    Config = AttentionAwareConfig
    needs_attention = True
    per_token = False
    cfg: AttentionAwareConfig

    def __init__(self, cfg: AttentionAwareConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        self.gate = normal_gate(d_model, num_experts)

    def graph(self, num_tokens: int, context: RouterContext) -> Tensor:
        """The masked, row-renormalised attention probabilities ``[B, S, S]`` in fp32."""
        B, S = token_layout(num_tokens, context)
        attn_BSS = context.attn_probs_BSS
        if attn_BSS is None or tuple(attn_BSS.shape) != (B, S, S):
            got = None if attn_BSS is None else tuple(attn_BSS.shape)
            raise ValueError(
                f"attention_aware routing needs RouterContext.attn_probs_BSS of shape {(B, S, S)}, got {got}; "
                "the model passes it to routers with needs_attention = True"
            )
        mask_BSS = sequence_mask(B, S, context.doc_ids_T, True, attn_BSS.device)
        attn_BSS = attn_BSS.float() * mask_BSS
        return attn_BSS / attn_BSS.sum(dim=-1, keepdim=True)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        logits_TE = gate_logits(x_TD, self.gate.weight)
        graph_BSS = self.graph(x_TD.shape[0], context)
        c = self.cfg
        return graph_mixed_decision(logits_TE, graph_BSS, c.mix, c.k, c.aux_loss_coef, c.z_loss_coef,
                                    scope_count_sum(c.balance_scope, context.sum_counts))
