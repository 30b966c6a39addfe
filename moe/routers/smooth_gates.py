"""Parts shared by the smooth-step gates (COMET, DSelect-k): the smooth step, entropy, the decision.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, E experts, K slots (here K =
E: every expert may be used).

Both gates produce a per-token distribution ``g_TE`` whose zeros are exact (a saturated smooth
step outputs exactly 0 or 1), so the number of experts a token uses is data dependent: dense
(all E) at initialisation, at most k once every split has hardened. ``gate_decision`` turns
``g_TE`` into a ``RoutingDecision`` with K = E slots sorted by weight and ``mask_TK`` marking the
nonzero ones, so dispatch (dropless) runs exactly the experts with g > 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.routers.interface import RoutingDecision


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """Cubic smooth step ``S_gamma`` (Hazimeh et al. 2020, arXiv 2002.07772, eq. 2).

    ``S(t) = 0`` for ``t <= -gamma/2``, ``1`` for ``t >= gamma/2`` and
    ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` in between. It is continuously differentiable
    (``S'(+-gamma/2) = 0``) and exactly 0 or 1 outside the band, which is what lets the tree and
    selector gates reach exact sparsity. The cubic is evaluated on the clamped input so the
    unselected branch never produces large values or gradients.
    """
    half = gamma / 2
    tc = t.clamp(-half, half)
    cubic = -2.0 * tc.pow(3) / gamma**3 + 3.0 * tc / (2.0 * gamma) + 0.5
    return torch.where(t <= -half, torch.zeros_like(t), torch.where(t >= half, torch.ones_like(t), cubic))


def entropy(p: Tensor, dim: int = -1, eps: float = 1e-9) -> Tensor:
    """Shannon entropy ``-sum p ln p`` in nats along ``dim``, with ``0 ln 0 = 0``.

    The log is of ``p`` clamped at ``eps`` so the gradient stays finite at exact zeros (which the
    smooth step produces on purpose).
    """
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=dim)


def gate_decision(
    g_TE: Tensor, aux_losses: dict[str, Tensor], probs_TE: Tensor | None = None
) -> RoutingDecision:
    """Decision for a gate whose weights ``g_TE`` are exactly zero for unused experts.

    Slots are the E experts sorted by weight (slot 0 is each token's top expert); ``mask_TK`` is
    ``weight > 0``. ``probs_TE`` (the distribution logged for statistics) defaults to ``g_TE``.
    """
    weights_TK, expert_ids_TK = torch.sort(g_TE, dim=-1, descending=True)
    return RoutingDecision(
        expert_ids_TK=expert_ids_TK,
        weights_TK=weights_TK,
        probs_TE=g_TE if probs_TE is None else probs_TE,
        mask_TK=weights_TK > 0,
        aux_losses=aux_losses,
    )
