"""Per-layer routing statistics, accumulated over every training forward between two reads.

Shape legend: T tokens, E experts, K slots.

Each MoE layer owns one ``RoutingStats``. ``update`` adds raw sums (no host sync); the trainer
calls ``all_reduce`` hooks once per log step via ``raw()`` (every raw entry is a SUM across ranks
and forwards) and turns the reduced sums into the logged values with ``summarize``. Logged keys
(prefixed ``routing/layer{i}/`` by the trainer), each with its formula:

- ``tokens_per_expert``: list, routed token-slots per expert ``n_e`` (after drops).
- ``load_cv``: coefficient of variation of the load, ``std_e(n_e) / mean_e(n_e)`` (population std).
- ``max_min_load``: ``max_e n_e / max(min_e n_e, 1)`` (an idle expert counts as 1 so it stays finite).
- ``entropy``: mean over tokens of ``H(p_t) = -sum_e p_te ln p_te``, nats, of the router's distribution.
- ``experts_per_token_mean`` / ``experts_per_token_max``: used slots per token.
- ``dropped_frac``: slots dropped by the capacity limit / slots routed (0 when dropless).
- ``aux_loss``, ``z_loss``, ...: mean over forwards of each auxiliary loss (with its coefficient).
- router extras (temperature, threshold, ...): mean over forwards.
- ``flips`` (logged at evaluations): fraction of the fixed probe batch's tokens whose top-1 expert
  (argmax of the router distribution) changed since the previous evaluation; absent at the first
  evaluation of a process, which has nothing to compare with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.dispatch import DispatchPlan
from moe.routers.base import RoutingDecision


class RoutingStats:
    """Accumulator of one layer's routing statistics (state owned by the layer, not global)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._max: dict[str, Tensor] = {}

    def _add(self, key: str, value: Tensor) -> None:
        value = value.detach().double()
        self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()

    @torch.no_grad()
    def update(self, decision: RoutingDecision, plan: DispatchPlan) -> None:
        """Fold one forward's decision and plan into the running sums."""
        probs_TE = decision.probs_TE.detach().float()
        per_token_T = decision.valid_mask().sum(dim=1)
        self._add("counts_E", plan.counts_E)
        self._add("tokens", torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device))
        self._add("forwards", torch.ones((), device=probs_TE.device))
        self._add("entropy_sum", -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum())
        self._add("slots_used", per_token_T.sum())
        self._add("routed", plan.num_routed)
        self._add("dropped", plan.num_dropped)
        ept_max = per_token_T.max().double() if per_token_T.numel() else torch.zeros((), device=probs_TE.device)
        self._max["experts_per_token_max"] = torch.maximum(self._max.get("experts_per_token_max", ept_max), ept_max)
        for name, loss in decision.aux_losses.items():
            self._add(f"mean/{name}", loss)
        for name, value in decision.extras.items():
            self._add(f"mean/{name}", torch.tensor(float(value), device=probs_TE.device))

    def raw(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The raw (sum-reduced, max-reduced) tensors, for a cross-rank all-reduce in place."""
        return self._sums, self._max

    @staticmethod
    def summarize(sums: dict[str, Tensor], maxes: dict[str, Tensor]) -> dict[str, float | list[int]]:
        """Turn reduced sums into the logged statistics (formulas in the module docstring)."""
        if not sums:
            return {}
        counts = sums["counts_E"].double()
        mean = counts.mean()
        out: dict[str, float | list[int]] = {
            "tokens_per_expert": [int(c) for c in counts.tolist()],
            "load_cv": float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
            "max_min_load": float(counts.max() / counts.min().clamp_min(1.0)),
            "entropy": float(sums["entropy_sum"] / sums["tokens"]),
            "experts_per_token_mean": float(sums["slots_used"] / sums["tokens"]),
            "experts_per_token_max": float(maxes["experts_per_token_max"]),
            "dropped_frac": float(sums["dropped"] / sums["routed"].clamp_min(1.0)),
        }
        forwards = sums["forwards"]
        for key, value in sums.items():
            if key.startswith("mean/"):
                out[key.removeprefix("mean/")] = float(value / forwards)
        return out


def routing_flip_fraction(previous_top1_T: Tensor, current_top1_T: Tensor) -> float:
    """Fraction of probe tokens whose top-1 expert differs between two evaluations."""
    if previous_top1_T.shape != current_top1_T.shape:
        raise ValueError(f"probe batches differ in size: {tuple(previous_top1_T.shape)} vs {tuple(current_top1_T.shape)}")
    return float((previous_top1_T != current_top1_T).float().mean())
