"""Dispatch: turn a RoutingDecision into an expert-sorted permutation and per-expert counts.

Shape legend: T tokens, D model dim, E experts, K slots per token, R routed rows (kept slots).

Slots are numbered token-major, ``slot = t*K + j``. The plan lists the kept slots sorted by
expert with a stable sort, so inside one expert rows stay in token order; this is the data
contract the kernels share (``slot_idx_R`` = kernels' ``sorted_slot_idx``, ``offsets_E1`` =
``expert_offsets``).

Dropless (default): every used slot is kept, whatever the load. Capacity mode (GShard/Switch):
expert e keeps at most ``C = ceil(K*T*cf/E)`` slots, filled in priority order (every token's
first choice before any token's second choice, tokens in order inside a choice); the overflow
is dropped, its weight is lost (the residual carries the token), and the count is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe.routers.base import RoutingDecision


@dataclass(frozen=True)
class DispatchPlan:
    """Where each routed row comes from and goes to.

    slot_idx_R:   int64 token-major slot id of each expert-sorted row.
    token_idx_R:  int64 token of each row (``slot_idx_R // K``).
    weight_R:     combine weight of each row (differentiable, fp32).
    counts_E:     int64 rows per expert; rows of expert e are ``offsets_E1[e]:offsets_E1[e+1]``.
    offsets_E1:   int64 exclusive scan of counts, length E+1.
    num_slots:    K, slots per token in the decision (slot ids run over T*K).
    num_routed:   int64 scalar, used slots before dropping.
    num_dropped:  int64 scalar, slots dropped by the capacity limit (0 when dropless).
    """

    slot_idx_R: Tensor
    token_idx_R: Tensor
    weight_R: Tensor
    counts_E: Tensor
    offsets_E1: Tensor
    num_slots: int
    num_routed: Tensor
    num_dropped: Tensor

    @property
    def num_rows(self) -> int:
        return self.slot_idx_R.shape[0]


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert capacity ``ceil(k*T*cf/E)`` (GShard §3; Switch eq. 3 with k=1)."""
    return math.ceil(k * num_tokens * capacity_factor / num_experts)


def dispatch(decision: RoutingDecision, num_experts: int, capacity_factor: float | None = None) -> DispatchPlan:
    """Build the plan for ``decision``; dropless when ``capacity_factor`` is None."""
    ids_TK = decision.expert_ids_TK
    T, K = ids_TK.shape
    E = num_experts
    used_TK = decision.valid_mask()
    valid_TK = used_TK
    if capacity_factor is not None:
        valid_TK = valid_TK & _within_capacity(ids_TK, valid_TK, E, capacity(T, K, E, capacity_factor))
    # Unused slots get key E so the stable sort puts them after every real expert.
    key_S = torch.where(valid_TK, ids_TK, torch.full_like(ids_TK, E)).reshape(-1)
    order_S = torch.argsort(key_S, stable=True)
    counts_E = _count(key_S, E + 1)[:E]
    num_rows = int(valid_TK.sum()) if (decision.mask_TK is not None or capacity_factor is not None) else T * K
    slot_idx_R = order_S[:num_rows]
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int64, device=ids_TK.device)
    offsets_E1[1:] = torch.cumsum(counts_E, dim=0)
    num_routed = used_TK.sum()
    return DispatchPlan(
        slot_idx_R=slot_idx_R,
        token_idx_R=torch.div(slot_idx_R, K, rounding_mode="floor"),
        weight_R=decision.weights_TK.reshape(-1)[slot_idx_R],
        counts_E=counts_E,
        offsets_E1=offsets_E1,
        num_slots=K,
        num_routed=num_routed,
        num_dropped=num_routed - counts_E.sum(),
    )


def _within_capacity(ids_TK: Tensor, valid_TK: Tensor, num_experts: int, cap: int) -> Tensor:
    """Bool [T, K]: slot keeps its place under the capacity limit, in priority order."""
    T, K = ids_TK.shape
    # Priority order is choice-major: slot (t, j) has priority j*T + t.
    key_P = torch.where(valid_TK, ids_TK, torch.full_like(ids_TK, num_experts)).t().reshape(-1)
    order_P = torch.argsort(key_P, stable=True)
    counts = _count(key_P, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_key = key_P[order_P]
    rank_sorted = torch.arange(key_P.numel(), device=ids_TK.device) - starts[sorted_key]
    rank_P = torch.empty_like(rank_sorted)
    rank_P[order_P] = rank_sorted
    return (rank_P < cap).reshape(K, T).t()


def _count(keys: Tensor, size: int) -> Tensor:
    """Occurrences of each value in ``[0, size)``; unlike ``bincount`` it never syncs with the host."""
    return torch.zeros(size, dtype=torch.int64, device=keys.device).scatter_add_(0, keys, torch.ones_like(keys))


def gather_rows(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Expert-sorted copy of the routed rows: ``x_RD[r] = x_TD[token_idx_R[r]]``."""
    return x_TD.index_select(0, plan.token_idx_R)


def combine(y_RD: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """``y_TD[t] = sum over rows r of token t of weight_R[r] * y_RD[r]``, reduced in fp32 (or fp64)."""
    acc = torch.promote_types(y_RD.dtype, torch.float32)
    weighted_RD = y_RD.to(acc) * plan.weight_R.to(acc).unsqueeze(-1)
    y_TD = torch.zeros(num_tokens, y_RD.shape[-1], dtype=acc, device=y_RD.device)
    return y_TD.index_add(0, plan.token_idx_R, weighted_RD).to(y_RD.dtype)
