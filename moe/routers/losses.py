"""Auxiliary router losses shared by the routing families.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, E experts, K slots, A the
T*K slots flattened.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moe.errors import check

CountSum = Callable[[Tensor], Tensor]
"""``counts_E -> counts_E`` summed over the data-parallel ranks (a fresh tensor, no gradient)."""

BALANCE_SCOPES = ("global", "micro_batch")
"""``router.balance_scope`` values: which tokens the Switch loss's ``f`` counts (``switch_balance_loss``)."""


def check_balance_scope(scope: str) -> None:
    """One clear error naming ``router.balance_scope`` when ``scope`` is not a known scope."""
    check(scope in BALANCE_SCOPES, "router.balance_scope", scope, f"must be one of {list(BALANCE_SCOPES)}")


def scope_count_sum(scope: str, sum_counts: CountSum | None) -> CountSum | None:
    """The cross-rank count sum a router hands ``switch_balance_loss``: ``sum_counts`` for the
    ``global`` scope, None (this micro-batch on this rank) for ``micro_batch``."""
    return sum_counts if scope == "global" else None


def slot_counts(expert_ids_TK: Tensor, num_experts: int, mask_TK: Tensor | None = None) -> Tensor:
    """int64 [E]: used slots per expert, by a scatter of ones (or of the mask) over E bins; exact
    integers, so the order of the additions does not matter, and no host synchronisation."""
    ids_A = expert_ids_TK.reshape(-1)
    ones_A = torch.ones_like(ids_A) if mask_TK is None else mask_TK.reshape(-1).to(ids_A.dtype)
    return torch.zeros(num_experts, dtype=ids_A.dtype, device=ids_A.device).scatter_add_(0, ids_A, ones_A)


def switch_balance_loss(
    probs_TE: Tensor, expert_ids_TK: Tensor, mask_TK: Tensor | None = None, sum_counts: CountSum | None = None, counts_E: Tensor | None = None,
) -> Tensor:
    """Switch Transformer load-balancing loss without its coefficient: ``E * sum_e f_e * P_e``.

    Fedus et al. 2021, eq. (4): ``f_e`` is the fraction of routed token-slots sent to expert e
    (over all K slots, the GShard/Mixtral generalisation of the top-1 fraction, which equals the
    paper's definition for K=1) and ``P_e`` the mean router probability of e. Equals 1 for
    perfectly uniform routing and E when every token goes to one expert with probability 1.

    ``sum_counts`` (the global-batch balance loss, Qiu et al. 2025, "Demons in the Detail",
    arXiv 2501.11873, §3): the per-expert counts behind ``f`` are summed over the data-parallel
    ranks first, so ``f`` is the fraction over every rank's tokens of this forward, while ``P``
    stays this rank's mean. ``f`` is a count and carries no gradient, so the ranks' mean loss
    ``E * sum_e f_e * mean_r P_e^r`` is exactly the single-process loss on the concatenated
    batch (equal tokens per rank), gradients included. Under gradient accumulation each
    micro-batch's ``f`` covers that micro-batch on every rank (later micro-batches are not yet
    routed; counting them would need a second forward).

    ``counts_E``: this forward's ``slot_counts`` when the caller has them already (top-k routing
    hands the same counts to dispatch); counted here otherwise. Either way they are exact
    integers, converted to ``probs_TE``'s dtype (exact below 2^24 slots per expert); no
    [T, K, E] one-hot is materialised.
    """
    T, E = probs_TE.shape
    if counts_E is None:
        counts_E = slot_counts(expert_ids_TK, E, mask_TK)
    return balance_loss_of_fraction(probs_TE, balance_fraction(counts_E, probs_TE.dtype, sum_counts))


def balance_fraction(counts_E: Tensor, dtype: torch.dtype, sum_counts: CountSum | None = None) -> Tensor:
    """The Switch loss's ``f_E``: slot counts (summed over ranks by ``sum_counts``) over their total,
    in ``dtype``; a count, so no gradient (``switch_balance_loss``)."""
    counts_E = counts_E.to(dtype)
    if sum_counts is not None:
        counts_E = sum_counts(counts_E.detach())
    return counts_E / counts_E.sum().clamp_min(1.0)


def balance_loss_of_fraction(probs_TE: Tensor, f_E: Tensor) -> Tensor:
    """``E * sum_e f_e * P_e`` with ``P_e`` the mean of ``probs_TE`` over tokens (``switch_balance_loss``)."""
    return probs_TE.shape[1] * torch.sum(f_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean_t (logsumexp_e h_te)^2``.

    Zoph et al. 2022, eq. (5); keeps router logits small so the fp32 softmax stays stable.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def z_loss_of_lse(lse_T: Tensor) -> Tensor:
    """``router_z_loss`` from the logits' ``logsumexp`` over experts, ``lse_T``: ``mean_t lse_t^2``."""
    return lse_T.pow(2).mean()
