"""Softmax top-k routing (Shazeer et al. 2017; GShard; Switch; Mixtral).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts, K
slots.

``I_t = TopK(h_t, k)``, ``G_te = softmax(h_t)_e / sum_{j in I_t} softmax(h_t)_j`` for k >= 2
(identical to a softmax over the selected logits, GShard's top-2 form). For k = 1 the weight is
the full-softmax probability, not renormalised (Switch Transformer, Fedus et al. 2021 §2.1):
renormalising would make it 1 and leave the router without gradient.

``router.renormalize`` overrides that rule for parity with released checkpoints: ``always``
renormalises for every k, top-1 included (Mixtral, Jiang et al. 2024 §2.1: a softmax over the
top-k logits, so a top-1 weight is exactly 1; transformers' ``MixtralTopKRouter``); ``never`` keeps
the full-softmax probabilities for every k (``norm_topk_prob=False`` in transformers' Qwen2/3-MoE
and OLMoE configs; OLMoE, Muennighoff et al. 2024). ``auto`` is the rule above.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from moe.autocast import takes_gpu_path
from moe.errors import check
from moe.routers.gate import gate_logits, normal_gate
from moe.routers.interface import KRouterConfig, Router, RouterContext, RoutingDecision
from moe.routers.local_search import LocalSearchConfig, PermutationLocalSearch
from moe.routers.losses import CountSum, check_balance_scope, scope_count_sum
from moe.routers.topk_gates import Gates, fused_gates, gates


RENORMALIZE = ("auto", "always", "never")


@dataclass(kw_only=True)
class TopKConfig(KRouterConfig):
    """``k`` (default 2): GShard's top-2 and Mixtral's 2 of 8."""

    name: str = "topk"
    jitter: float = 0.0
    """Switch multiplicative input jitter: x * U(1-jitter, 1+jitter) in training; 0 disables."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch load-balancing loss (Fedus et al. eq. 4; α = 1e-2, their §2.2)."""
    z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss (Zoph et al. eq. 5; c_z = 1e-3, their §3.3)."""
    balance_scope: str = "global"
    """Which tokens the balance loss's f counts: global (this forward's tokens on every
    data-parallel rank, Qiu et al. 2025; N ranks then train like one process) | micro_batch
    (this rank's micro-batch only). Equal in one process without gradient accumulation."""
    local_search: LocalSearchConfig = field(default_factory=LocalSearchConfig)
    """Permutation local search of the expert axis (COMET+ wrapper, moe.routers.local_search)."""
    renormalize: str = "auto"
    """Gate weights of the selected experts: auto (k >= 2: renormalised over the top k, GShard;
    k = 1: the full-softmax probability, Switch) | always (renormalised for every k, so top-1 gets
    weight 1 and the router learns only through the auxiliary losses: Mixtral) | never (the
    full-softmax probabilities: norm_topk_prob=False in Qwen-MoE and OLMoE)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.jitter < 1.0, "router.jitter", self.jitter, "must be in [0, 1)")
        check(self.aux_loss_coef >= 0, "router.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, "router.z_loss_coef", self.z_loss_coef, "must be >= 0")
        check_balance_scope(self.balance_scope)
        check(self.renormalize in RENORMALIZE, "router.renormalize", self.renormalize, f"must be one of {list(RENORMALIZE)}")


class TopKRouter(Router):
    """Linear gate ``h = x W_g`` with fp32 logits, top-k selection, Switch/GShard weights and losses."""

    Config = TopKConfig
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        self.gate = normal_gate(d_model, num_experts)
        self.local_search = PermutationLocalSearch(cfg.local_search, num_experts, 1) if cfg.local_search.enabled else None

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits ``h_TE`` in fp32 (with jitter in training; ``moe.routers.gate``)."""
        if self.training and self.cfg.jitter > 0:
            x_TD = x_TD.float()
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
        return gate_logits(x_TD, self.gate.weight)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        c = self.cfg
        sum_counts = scope_count_sum(c.balance_scope, context.sum_counts)
        if self.local_search is None:
            # One autograd node with a closed-form backward on GPUs; autograd through the same ops on
            # the CPU, whose runs stay bit-identical (moe.routers.topk_gates).
            select = fused_gates if takes_gpu_path(logits_TE) else gates
            return decision_of(select(logits_TE, c.k, renormalizes(c.renormalize, c.k), c.aux_loss_coef, c.z_loss_coef, sum_counts))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        probs_TE, perm_aux = self.local_search.mix(probs_TE.unsqueeze(1), context.step)
        decision = topk_decision(logits_TE, probs_TE, c.k, c.aux_loss_coef, c.z_loss_coef, c.renormalize, sum_counts)
        return replace(decision, aux_losses={**decision.aux_losses, **perm_aux})

    @torch.no_grad()
    def after_step(self, step: int, experts: nn.Module) -> None:
        if self.local_search is not None:
            self.local_search.after_step(step)


def topk_decision(
    logits_TE: Tensor, probs_TE: Tensor, k: int, aux_loss_coef: float, z_loss_coef: float, renormalize: str = "auto",
    sum_counts: CountSum | None = None,
) -> RoutingDecision:
    """Select the top-k of ``probs_TE`` and build the decision with Switch weights and losses.

    ``renormalize`` is ``TopKConfig.renormalize`` (auto: only for k >= 2); ``sum_counts`` sums the
    balance loss's expert counts over data-parallel ranks (``switch_balance_loss``). Shared by routers that
    differ only in how they produce ``probs_TE`` (similarity- and attention-aware mixing select on
    the mixed distribution).
    """
    return decision_of(gates(logits_TE, k, renormalizes(renormalize, k), aux_loss_coef, z_loss_coef, sum_counts, probs_TE))


def renormalizes(renormalize: str, k: int) -> bool:
    """Whether ``router.renormalize`` renormalises the top-k weights at this k (module docstring)."""
    return renormalize == "always" or (renormalize == "auto" and k > 1)


def decision_of(g: Gates) -> RoutingDecision:
    """The routing decision of top-k ``gates`` (the slot counts go along for dropless dispatch)."""
    aux = {name: loss for name, loss in (("aux_loss", g.aux), ("z_loss", g.z)) if loss is not None}
    return RoutingDecision(expert_ids_TK=g.ids_TK, weights_TK=g.weights_TK, probs_TE=g.probs_TE, aux_losses=aux, counts_E=g.counts_E)
