"""Auxiliary router losses shared by the routing families.

Shape legend: T tokens, E experts, K slots.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor, mask_TK: Tensor | None = None) -> Tensor:
    """Switch Transformer load-balancing loss without its coefficient: ``E * sum_e f_e * P_e``.

    Fedus et al. 2021, eq. (4): ``f_e`` is the fraction of routed token-slots sent to expert e
    (over all K slots, the GShard/Mixtral generalisation of the top-1 fraction, which equals the
    paper's definition for K=1) and ``P_e`` the mean router probability of e. Equals 1 for
    perfectly uniform routing and E when every token goes to one expert with probability 1.
    """
    T, E = probs_TE.shape
    # Slot counts per expert by a scatter of ones over E bins (exact integers in fp32, so any
    # summation order gives the same counts); no [T, K, E] one-hot is materialised.
    ids_S = expert_ids_TK.reshape(-1)
    ones_S = torch.ones_like(ids_S, dtype=probs_TE.dtype) if mask_TK is None else mask_TK.reshape(-1).to(probs_TE.dtype)
    counts_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device).scatter_add_(0, ids_S, ones_S)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean_t (logsumexp_e h_te)^2``.

    Zoph et al. 2022, eq. (5); keeps router logits small so the fp32 softmax stays stable.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
