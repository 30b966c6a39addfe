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
    one_hot_TKE = torch.nn.functional.one_hot(expert_ids_TK, E).to(probs_TE.dtype)
    if mask_TK is not None:
        one_hot_TKE = one_hot_TKE * mask_TK.unsqueeze(-1).to(probs_TE.dtype)
    slots = one_hot_TKE.sum(dim=(0, 1)).sum().clamp_min(1.0)
    f_E = one_hot_TKE.sum(dim=(0, 1)) / slots
    P_E = probs_TE.mean(dim=0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean_t (logsumexp_e h_te)^2``.

    Zoph et al. 2022, eq. (5); keeps router logits small so the fp32 softmax stays stable.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
