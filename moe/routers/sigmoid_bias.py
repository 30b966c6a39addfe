"""DeepSeek-V3 sigmoid gate with auxiliary-loss-free bias balancing.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts, K
slots, G expert groups, B batch, S sequence.

DeepSeek-V3 technical report (arXiv 2412.19437) §2.1.2, and ``deepseek-ai/DeepSeek-V3:
inference/model.py`` (``Gate``):

- affinities ``s = σ(h)``, ``h = x W_g`` in fp32 (eq. 15);
- selection on biased scores ``TopK(s + b, k)`` (eq. 16), optionally group-limited: experts
  form G groups, a group's score is the sum of its top-2 ``s + b``, and only the ``topk_groups``
  best groups are eligible (V3: 8 groups, top 4);
- weights from the UNBIASED scores: ``g = s_sel / Σ s_sel · route_scale`` (eq. 13; the bias
  steers selection only, never the weights);
- after each optimizer step, without gradient: ``b_e ← b_e + γ · sign(mean_load − load_e)``,
  loads counted over the step's training forwards (``load_counts_E``, reset after the update);
- complementary sequence-wise balance loss (eqs. 17-20), per sequence of length S:
  ``f_i = E/(k·S) · Σ_t 1[i selected for t]``, ``P_i = (1/S) Σ_t s_it / Σ_j s_jt``,
  ``L = α · Σ_i f_i P_i``, averaged over the B sequences.

``probs_TE`` (for entropy statistics) is the per-token normalised affinity ``s / Σ_e s``.
Under data parallelism the trainer sums ``load_counts_E`` over ranks (``step_sums``) before
``after_step``, so every rank applies the same bias update.

Checked against ``deepseek-ai/DeepSeek-V3: inference/model.py`` (``Gate.forward``): sigmoid
scores kept as ``original_scores``; bias added for selection only; with a bias, a group's score
is the sum of its top-2 biased scores (``amax`` without); top-k on the biased scores; weights
gathered from the unbiased scores, divided by their sum (sigmoid path), times ``route_scale``:
the same. That file is inference-only (the bias is loaded, never updated), so the update rule
and γ come from the report (§2.1.2: γ = 0.001 for the first 14.3T tokens); the sequence-wise loss
and α = 1e-4 from eqs. 17-20 and §4.2. ``route_scale = 1.0`` is ``ModelArgs``' default in that
file (the 671B config sets 2.5); ``k = 2`` matches the other routers here (V3: 8 of 256).
Differences: the gate is ``N(0, 1/D)`` like every router here (the release's ``Gate.weight`` is
``torch.empty``, filled from the checkpoint, so it fixes no init).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.recompute import is_recomputing
from moe.routers.gate import gate_logits, normal_gate
from moe.routers.interface import KRouterConfig, Router, RouterContext, RoutingDecision


@dataclass(kw_only=True)
class SigmoidBiasConfig(KRouterConfig):
    """``k``: experts per token (V3: 8 of 256)."""

    name: str = "sigmoid_bias"
    route_scale: float = 1.0
    """Multiplier of the normalised weights (V3: 2.5)."""
    renormalize: bool = True
    """Weights ``s_sel / Σ s_sel`` (V3); False keeps raw ``s_sel`` (k = 1 then still trains the gate)."""
    bias_update_rate: float = 0.001
    """γ of the bias update ``b_e += γ·sign(mean_load − load_e)`` (V3: 1e-3; 0 freezes b)."""
    n_groups: int = 1
    """Expert groups for group-limited routing (1 = off; V3: 8)."""
    topk_groups: int = 1
    """Groups each token may use (V3: 4)."""
    seq_aux_loss_coef: float = 0.0001
    """α of the sequence-wise balance loss (V3 eq. 17-20: 1e-4; 0 disables)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.route_scale > 0, "router.route_scale", self.route_scale, "must be > 0")
        check(self.bias_update_rate >= 0, "router.bias_update_rate", self.bias_update_rate, "must be >= 0")
        check(self.n_groups >= 1, "router.n_groups", self.n_groups, "must be >= 1")
        check(
            1 <= self.topk_groups <= self.n_groups,
            "router.topk_groups",
            self.topk_groups,
            f"must be in [1, router.n_groups ({self.n_groups})]",
        )
        check(self.seq_aux_loss_coef >= 0, "router.seq_aux_loss_coef", self.seq_aux_loss_coef, "must be >= 0")

    def check_num_experts(self, num_experts: int) -> None:
        """``k <= E``, groups that divide E, and ``k`` within the experts of ``topk_groups`` groups."""
        super().check_num_experts(num_experts)
        E = num_experts
        check(E % self.n_groups == 0, "router.n_groups", self.n_groups, f"must divide model.num_experts ({E})")
        eligible = self.topk_groups * (E // self.n_groups)
        check(
            self.k <= eligible,
            "router.k",
            self.k,
            f"must be <= the experts in router.topk_groups groups ({eligible} of model.num_experts = {E})",
        )


def group_limited_scores(biased_TE: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """``biased_TE`` with every expert outside the token's ``topk_groups`` best groups set to -inf.

    A group's score is the sum of its top-2 biased scores (its top-1 if groups have one expert).
    """
    T, E = biased_TE.shape
    grouped_TGE = biased_TE.view(T, n_groups, E // n_groups)
    group_score_TG = grouped_TGE.topk(min(2, E // n_groups), dim=-1).values.sum(dim=-1)
    keep_TG = torch.zeros(T, n_groups, dtype=torch.bool, device=biased_TE.device)
    keep_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    return grouped_TGE.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


def sequence_balance_loss(scores_TE: Tensor, ids_TK: Tensor, batch_size: int, seq_len: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss without α: mean over sequences of ``Σ_i f_i P_i``.

    Eqs. 17-20: ``f_i = E/(k·S) Σ_t 1[i ∈ TopK_t]``, ``P_i = (1/S) Σ_t s'_it``, ``s' = s / Σ_j s_j``.
    Equals 1 when the normalised affinities are uniform.
    """
    T, E = scores_TE.shape
    K = ids_TK.shape[1]
    norm_BSE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(batch_size, seq_len, E)
    hits_BE = nn.functional.one_hot(ids_TK.reshape(batch_size, seq_len * K), E).sum(dim=1).float()
    f_BE = hits_BE * E / (K * seq_len)
    P_BE = norm_BSE.mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


class SigmoidBiasRouter(Router):
    """Sigmoid affinities, bias-steered top-k selection, unbiased normalised weights (DeepSeek-V3)."""

    Config = SigmoidBiasConfig
    cfg: SigmoidBiasConfig

    def __init__(self, cfg: SigmoidBiasConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        E = num_experts
        self.gate = normal_gate(d_model, E)
        self.register_buffer("expert_bias_E", torch.zeros(E))
        self.register_buffer("load_counts_E", torch.zeros(E), persistent=False)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        cfg = self.cfg
        scores_TE = torch.sigmoid(gate_logits(x_TD, self.gate.weight))
        biased_TE = scores_TE.detach() + self.expert_bias_E.float()
        if cfg.n_groups > 1:
            biased_TE = group_limited_scores(biased_TE, cfg.n_groups, cfg.topk_groups)
        ids_TK = torch.topk(biased_TE, cfg.k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * cfg.route_scale
        if self.training and not is_recomputing():  # a checkpointed forward run again counts once
            with torch.no_grad():
                self.load_counts_E += torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts).float()
        aux: dict[str, Tensor] = {}
        if cfg.seq_aux_loss_coef > 0:
            if context.batch_size is None or context.seq_len is None:
                raise ValueError(
                    "router sigmoid_bias with router.seq_aux_loss_coef > 0 needs RouterContext.batch_size "
                    "and seq_len (the sequence-wise loss is per sequence); set them or the coefficient to 0"
                )
            loss = sequence_balance_loss(scores_TE, ids_TK, context.batch_size, context.seq_len)
            aux["seq_aux_loss"] = cfg.seq_aux_loss_coef * loss
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return RoutingDecision(expert_ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, aux_losses=aux)

    def step_sums(self) -> list[Tensor]:
        """The step's load counts: summed over data-parallel ranks before the bias update."""
        return [self.load_counts_E]

    @torch.no_grad()
    def after_step(self, step: int, experts: nn.Module) -> None:
        """``b_e += γ · sign(mean_load − load_e)`` over this step's counted loads, then reset them."""
        counts_E = self.load_counts_E  # all zero (no training forward) gives sign 0: no change
        self.expert_bias_E += self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        counts_E.zero_()
