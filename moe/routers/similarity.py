"""Similarity-aware routing (Nguyen, Tran, Nguyen, Baraniuk 2025, arXiv 2505.00792 §2).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T = B*S tokens, D model dim, E
experts, K slots, B batch, S sequence, R similarity rank (``router.d_sim``).

Each token i picks a latent neighbour ``j ~ Cat(S_i)`` in its own sequence and routes with that
neighbour's expert distribution, so the routing distribution becomes ``pi~ = S pi`` with
``pi = softmax(h)``, ``h = x W_g``; the top-k of ``pi~`` is taken and renormalised exactly as in
top-k routing (``moe.routers.topk.topk_decision``). The token graph is
``S = softmax_row(X W_s X^T / tau)`` per sequence, masked so token i never sees a later token
(causal, decoders) or a token of another document (``RouterContext.doc_ids_T``, packed
sequences); the diagonal is never masked, so every row is defined.

**This is a reconstruction.** No public code exists; the formulas follow the paper's graphical
model as summarised in research/routers.md §6, and the uncertain choices are config values:
the form of ``W_s`` (``symmetric``: ``A A^T`` vs ``A B^T``, each of rank ``d_sim`` and scaled by
``1/sqrt(d_sim)`` like attention), the temperature ``tau``, whether probabilities or logits are
mixed (``mix``), and the load-balancing loss, which is the Switch loss on ``pi~`` (⚠ assumed).

Sources searched (this check): the public code index has no release of the paper (queries for
Similarity-Aware / Attention-Aware SMoE and "Graph of Tokens" return only the arXiv abstract
pages and unrelated repositories), and the stored paper text stops at the abstract, so §2-3
could not be read here. What the abstract does fix: the router mixes over *tokens* via token
similarities (Similarity-Aware) or the attention matrix (Attention-Aware), and this is claimed to
lower the entropy of expert selection and reduce late-training routing fluctuations. Defaults and
where they come from: ``k = 2`` (the paper's WikiText-103 and V-MoE experiments use top-2, per
research notes; the abstract does not say); ``d_sim = 64``, ``tau = 1``, ``symmetric = True``,
``mix = probs`` are this reconstruction's choices (``mix = probs`` is the graphical model's
``pi~ = S pi``); ``aux_loss_coef = 0.01`` and ``z_loss_coef = 0.001`` are the Switch / ST-MoE
values of the base top-k router (``moe.routers.topk``), kept so the comparison with top-k changes
only the routing. Test of the abstract's claim on our tasks: docs/compare_routers/README.md.

``graph_mixed_decision`` (the mixing + top-k) and ``sequence_mask`` are shared with
attention-aware routing (``moe.routers.attention_aware``), which uses the attention
probabilities as the graph instead of ``S``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.routers.gate import gate_logits, normal_gate
from moe.routers.interface import KRouterConfig, Router, RouterContext, RoutingDecision
from moe.routers.losses import CountSum, check_balance_scope, scope_count_sum
from moe.routers.topk import topk_decision

MIX_SPACES = ("probs", "logits")


@dataclass(kw_only=True)
class SimilarityConfig(KRouterConfig):
    name: str = "similarity"
    d_sim: int = 64
    """Rank of the similarity bilinear form W_s."""
    tau: float = 1.0
    """Temperature of the token-similarity softmax; larger smooths routing over more neighbours."""
    symmetric: bool = True
    """W_s = A A^T (one projection, a similarity) if true, else A B^T (query/key-like)."""
    causal: bool = True
    """Mask later tokens (decoders); false only for bidirectional encoders."""
    mix: str = "probs"
    """What the graph averages: probs (pi~ = S softmax(h), the paper's model) or logits (softmax(S h))."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch load-balancing loss, computed on the mixed distribution."""
    z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss on the unmixed logits h."""
    balance_scope: str = "global"
    """Which tokens the balance loss's f counts: global (every data-parallel rank's) | micro_batch
    (this rank's); see router.balance_scope of topk."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.d_sim >= 1, "router.d_sim", self.d_sim, "must be >= 1")
        check(self.tau > 0, "router.tau", self.tau, "must be > 0")
        check(self.mix in MIX_SPACES, "router.mix", self.mix, f"must be one of {list(MIX_SPACES)}")
        check(self.aux_loss_coef >= 0, "router.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, "router.z_loss_coef", self.z_loss_coef, "must be >= 0")
        check_balance_scope(self.balance_scope)


def token_layout(num_tokens: int, context: RouterContext) -> tuple[int, int]:
    """``(B, S)`` of the flattened tokens, from the context; raises if it is missing or wrong."""
    B, S = context.batch_size, context.seq_len
    if B is None or S is None or B * S != num_tokens:
        raise ValueError(
            f"token-graph routing needs RouterContext.batch_size/seq_len with B*S = T; got B={B}, S={S}, T={num_tokens}"
        )
    return B, S


def sequence_mask(batch_size: int, seq_len: int, doc_ids_T: Tensor | None, causal: bool, device: torch.device) -> Tensor:
    """Bool ``[B, S, S]``: token i may use token j (``j <= i`` if causal, same document if given)."""
    mask_BSS = torch.ones(batch_size, seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        mask_BSS = mask_BSS & torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if doc_ids_T is not None:
        doc_BS = doc_ids_T.view(batch_size, seq_len)
        mask_BSS = mask_BSS & (doc_BS.unsqueeze(2) == doc_BS.unsqueeze(1))
    return mask_BSS


def graph_mixed_decision(
    logits_TE: Tensor, graph_BSS: Tensor, mix: str, k: int, aux_loss_coef: float, z_loss_coef: float,
    sum_counts: CountSum | None = None,
) -> RoutingDecision:
    """Top-k decision on the graph-mixed distribution ``pi~ = G pi`` (or ``softmax(G h)``).

    ``graph_BSS`` is row-stochastic per sequence (rows sum to 1), so ``pi~`` rows sum to 1.
    The Switch balance loss is computed on ``pi~`` (its counts summed over ranks by ``sum_counts``
    when given), the z-loss on the unmixed logits.
    """
    B, S, _ = graph_BSS.shape
    T, E = logits_TE.shape
    if mix == "logits":
        mixed_TE = torch.softmax((graph_BSS @ logits_TE.view(B, S, E)).view(T, E), dim=-1)
    else:
        mixed_TE = (graph_BSS @ torch.softmax(logits_TE, dim=-1).view(B, S, E)).view(T, E)
    return topk_decision(logits_TE, mixed_TE, k, aux_loss_coef, z_loss_coef, sum_counts=sum_counts)


class SimilarityRouter(Router):
    """Linear gate mixed over a learned, masked token-similarity graph, then top-k."""

    Config = SimilarityConfig
    per_token = False  # mixes routing over earlier tokens of the document

    cfg: SimilarityConfig

    def __init__(self, cfg: SimilarityConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        self.gate = normal_gate(d_model, num_experts)
        self.sim_a = normal_gate(d_model, cfg.d_sim)
        self.sim_b = None if cfg.symmetric else normal_gate(d_model, cfg.d_sim)

    def similarity(self, x_TD: Tensor, context: RouterContext) -> Tensor:
        """Row-stochastic, masked ``S_BSS = softmax_row(X W_s X^T / (tau sqrt(d_sim)))``."""
        B, S = token_layout(x_TD.shape[0], context)
        x_BSD = x_TD.float().view(B, S, -1)
        u_BSR = nn.functional.linear(x_BSD, self.sim_a.weight.float())
        v_BSR = u_BSR if self.sim_b is None else nn.functional.linear(x_BSD, self.sim_b.weight.float())
        scores_BSS = (u_BSR @ v_BSR.transpose(1, 2)) / (self.cfg.tau * math.sqrt(self.cfg.d_sim))
        mask_BSS = sequence_mask(B, S, context.doc_ids_T, self.cfg.causal, x_TD.device)
        return torch.softmax(scores_BSS.masked_fill(~mask_BSS, float("-inf")), dim=-1)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        logits_TE = gate_logits(x_TD, self.gate.weight)
        graph_BSS = self.similarity(x_TD, context)
        c = self.cfg
        return graph_mixed_decision(logits_TE, graph_BSS, c.mix, c.k, c.aux_loss_coef, c.z_loss_coef,
                                    scope_count_sum(c.balance_scope, context.sum_counts))
