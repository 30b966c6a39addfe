"""Dispatch: turn a RoutingDecision into an expert-sorted permutation and per-expert counts.

Shape letters: the ``moe`` package legend (T tokens, K slots per token, A = T*K slots, R rows).

Slots are numbered token-major, ``a = t*K + j``. The plan lists the kept slots sorted by
expert with a stable sort, so inside one expert rows stay in token order; this is the data
contract the kernels share (their ``slot_idx_R`` and ``expert_offsets_E1``).

Dropless (default): every used slot is kept, whatever the load. Capacity mode (GShard/Switch):
expert e keeps at most ``cap = ceil(K*T*cf/E)`` slots, filled in priority order (every token's
first choice before any token's second choice, tokens in order inside a choice); the overflow
is dropped, its weight is lost (the residual carries the token), and the count is reported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import ops
from moe.routers.interface import RoutingDecision


@dataclass(frozen=True)
class DispatchPlan:
    """Where each routed row comes from and goes to.

    slot_idx_R:   int64 token-major slot id of each expert-sorted row.
    token_idx_R:  int64 token of each row (``slot_idx_R // K``).
    weight_R:     combine weight of each row (differentiable, fp32).
    counts_E:     int64 rows per expert; rows of expert e are ``offsets_E1[e]:offsets_E1[e+1]``.
    offsets_E1:   int64 exclusive scan of counts, length E+1 (computed on first use).
    slots_per_token: K, slots per token in the decision (slot ids run over A = T*K).
    num_routed:   used slots before dropping: an int64 scalar tensor, or the host's int ``A``
                  when every slot is used (no kernel launched for a number the host knows).
    num_dropped:  slots dropped by the capacity limit: an int64 scalar tensor, or the int 0
                  when dropless.
    row_of_slot_A: int32 [A] inverse permutation: the row of each token-major slot, -1 for a
                  slot without a row (masked or dropped). Combining rows back into tokens is a
                  gather through it (``kernels.ops.unpermute``), never an atomic scatter.
    """

    slot_idx_R: Tensor
    token_idx_R: Tensor
    weight_R: Tensor
    counts_E: Tensor
    slots_per_token: int
    num_routed: Tensor | int
    num_dropped: Tensor | int
    row_of_slot_A: Tensor

    @property
    def num_rows(self) -> int:
        return self.slot_idx_R.shape[0]

    @functools.cached_property
    def offsets_E1(self) -> Tensor:
        offsets_E1 = self.counts_E.new_zeros(self.counts_E.shape[0] + 1)
        offsets_E1[1:] = torch.cumsum(self.counts_E, dim=0)
        return offsets_E1


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert capacity ``ceil(k*T*cf/E)`` (GShard §3; Switch eq. 3 with k=1)."""
    return math.ceil(k * num_tokens * capacity_factor / num_experts)


def dispatch(decision: RoutingDecision, num_experts: int, capacity_factor: float | None = None) -> DispatchPlan:
    """Build the plan for ``decision``; dropless when ``capacity_factor`` is None."""
    ids_TK = decision.expert_ids_TK
    T, K = ids_TK.shape
    E, A = num_experts, T * K
    valid_TK = decision.mask_TK  # None: every slot is used and kept
    if capacity_factor is not None:
        used_TK = decision.valid_mask()
        valid_TK = used_TK & _within_capacity(ids_TK, used_TK, E, capacity(T, K, E, capacity_factor))
    # Unused slots get key E so the stable sort puts them after every real expert; int16 keys
    # (E < 2^15) keep the device radix sort to two 8-bit passes.
    key_A = (ids_TK if valid_TK is None else torch.where(valid_TK, ids_TK, E)).reshape(-1)
    order_A = torch.argsort(key_A.to(torch.int16) if E < 2**15 else key_A, stable=True)
    # Dropless, the router's own counts of the used slots (if it made them) are the rows per expert.
    counts_E = decision.counts_E if capacity_factor is None and decision.counts_E is not None else _count(key_A, E + 1)[:E]
    num_rows = A if valid_TK is None else int(valid_TK.sum())  # the one host sync: a variable row count
    weight_R, row_of_slot_A, token_idx_R = _PlanRows.apply(decision.weights_TK.reshape(-1), order_A, K, num_rows)
    num_routed = A if decision.mask_TK is None else decision.mask_TK.sum()
    return DispatchPlan(
        slot_idx_R=order_A[:num_rows],
        token_idx_R=token_idx_R,
        weight_R=weight_R,
        counts_E=counts_E,
        slots_per_token=K,
        num_routed=num_routed,
        num_dropped=0 if valid_TK is None else num_routed - counts_E.sum(),
        row_of_slot_A=row_of_slot_A,
    )


class _PlanRows(torch.autograd.Function):
    """From the sorted slot order: the combine weight of each row ``v_R = v_A[order_A[:R]]``, the
    inverse permutation ``row_of_slot_A`` and each row's token, in one launch on a GPU
    (``kernels.ops.plan_indices``; torch's arange, scatter, division and gather elsewhere, the
    same integers and copies).

    The weights' backward puts each row's gradient back in its slot: the inverse permutation's
    gather ``g_A = g_R[row_of_slot_A]`` when every slot has a row (one launch), else a scatter into
    zeros (``index_copy``: every slot has at most one row, so nothing accumulates)."""

    @staticmethod
    def forward(ctx, v_A: Tensor, order_A: Tensor, K: int, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        row_of_slot_A, token_idx_R, v_R = ops.plan_indices(order_A, v_A, K, num_rows)
        ctx.A, ctx.gather = v_A.shape[0], num_rows == v_A.shape[0]
        ctx.save_for_backward(row_of_slot_A if ctx.gather else order_A[:num_rows])
        ctx.mark_non_differentiable(row_of_slot_A, token_idx_R)
        ctx.set_materialize_grads(False)  # no zero gradients made for the two index outputs
        return v_R, row_of_slot_A, token_idx_R

    @staticmethod
    def backward(ctx, g_R: Tensor | None, _rows: None, _tokens: None) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        if g_R is None:
            return None, None, None, None
        if ctx.gather:
            return g_R.index_select(0, idx), None, None, None
        return g_R.new_zeros(ctx.A).index_copy_(0, idx, g_R), None, None, None


def _within_capacity(ids_TK: Tensor, valid_TK: Tensor, num_experts: int, cap: int) -> Tensor:
    """Bool [T, K]: slot keeps its place under the capacity limit, in priority order."""
    T, K = ids_TK.shape
    # Slots in priority order, choice-major: slot (t, j) sits at j*T + t.
    prio_key_A = torch.where(valid_TK, ids_TK, torch.full_like(ids_TK, num_experts)).t().reshape(-1)
    prio_order_A = torch.argsort(prio_key_A, stable=True)
    counts = _count(prio_key_A, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_key = prio_key_A[prio_order_A]
    rank_sorted = torch.arange(prio_key_A.numel(), device=ids_TK.device) - starts[sorted_key]
    prio_rank_A = torch.empty_like(rank_sorted)
    prio_rank_A[prio_order_A] = rank_sorted
    return (prio_rank_A < cap).reshape(K, T).t()


def _count(keys: Tensor, size: int) -> Tensor:
    """Occurrences of each value in ``[0, size)``; unlike ``bincount`` it never syncs with the host."""
    return torch.zeros(size, dtype=torch.int64, device=keys.device).scatter_add_(0, keys, torch.ones_like(keys))


def gather_rows(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Expert-sorted copy of the routed rows: ``x_RD[r] = x_TD[token_idx_R[r]]``.

    Backward sums each token's row gradients through ``plan.row_of_slot_A`` (fp32, slot order,
    no atomics) instead of ``index_select``'s ``index_add``.
    """
    return _GatherRows.apply(x_TD, plan.token_idx_R, plan.row_of_slot_A, plan.slots_per_token)


def combine(y_RD: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """``y_TD[t] = sum over rows r of token t of weight_R[r] * y_RD[r]``, reduced in fp32.

    A gather through ``plan.row_of_slot_A`` (``kernels.ops.unpermute``): deterministic, no atomics.
    """
    assert plan.row_of_slot_A.shape[0] == num_tokens * plan.slots_per_token, "plan is for another token count"
    return _Combine.apply(y_RD, plan.weight_R, plan.token_idx_R, plan.row_of_slot_A, plan.slots_per_token)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, token_idx_R: Tensor, row_of_slot_A: Tensor, K: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(row_of_slot_A)
        ctx.K = K
        return x_TD.index_select(0, token_idx_R)

    @staticmethod
    def backward(ctx, dx_RD: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (row_of_slot_A,) = ctx.saved_tensors
        return ops.unpermute(dx_RD.contiguous(), None, row_of_slot_A, ctx.K, None), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD: Tensor, weight_R: Tensor, token_idx_R: Tensor, row_of_slot_A: Tensor, K: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y_RD, weight_R, token_idx_R)
        return ops.unpermute(y_RD.contiguous(), None, row_of_slot_A, K, weight_R)

    @staticmethod
    def backward(ctx, dy_TD: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:  # type: ignore[override]
        y_RD, weight_R, token_idx_R = ctx.saved_tensors
        acc = torch.promote_types(y_RD.dtype, torch.float32)
        dy_RD = dy_TD.index_select(0, token_idx_R).to(acc)  # each row's token gradient
        dweight_R = (dy_RD * y_RD.to(acc)).sum(-1).to(weight_R.dtype) if ctx.needs_input_grad[1] else None
        dy_RD = (dy_RD * weight_R.to(acc)[:, None]).to(y_RD.dtype) if ctx.needs_input_grad[0] else None
        return dy_RD, dweight_R, None, None, None
