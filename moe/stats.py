"""Per-layer routing statistics, accumulated over every training forward between two reads.

Shape letters: the ``moe`` package legend (T tokens, E experts, K slots per token).

Each MoE layer owns one ``RoutingStats``. ``update`` adds raw sums (no host sync); the trainer
calls ``all_reduce`` hooks once per log step via ``raw()`` (every raw entry is a SUM across ranks
and forwards) and turns the reduced sums into the logged values with ``summarize``. Logged keys
(prefixed ``routing/layer{i}/`` by the trainer), each with its formula:

- ``tokens_per_expert``: list, routed token-slots per expert ``n_e`` (after drops).
- ``load_cv``: coefficient of variation of the load, ``std_e(n_e) / mean_e(n_e)`` (population std).
- ``max_min_load``: ``max_e n_e / max(min_e n_e, 1)`` (an idle expert counts as 1 so it stays finite).
- ``dead_fraction``: fraction of experts that received no token-slot in the window, ``mean_e [n_e = 0]``.
- ``entropy``: mean over tokens of the entropy ``-sum_e p_te ln p_te`` (nats) of the router's distribution.
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
from moe.routers.interface import RoutingDecision


class RoutingStats:
    """Accumulator of one layer's routing statistics (state owned by the layer, not global).

    ``update`` runs every training forward, so it is written for the GPU: no host
    synchronisation and a handful of launches (the entropy reduction, one stack of the scalar
    sums added into a float64 accumulator, the per-expert counts). Quantities the host already
    knows (tokens, forwards, slots when no slot is masked, router extras) stay Python numbers.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._carried: dict[str, float] = {}  # load_raw's scalar sums, each the seed of its accumulator
        self._host: dict[str, float] = {}
        self._device: dict[tuple[str, ...], Tensor] = {}  # names -> float64 sums, one vector per key set
        self._counts: Tensor | None = None
        self._max: dict[str, Tensor | float] = {}

    def _add_host(self, key: str, value: float) -> None:
        self._host[key] = self._host.get(key, self._carried.pop(key, 0.0)) + float(value)

    def _add_device(self, names: tuple[str, ...], values: list[Tensor]) -> None:
        stacked = torch.stack([v.detach() for v in values])
        if names in self._device:
            self._device[names].add_(stacked)
            return
        self._device[names] = stacked.double()
        seeds = [self._carried.pop(n, 0.0) for n in names]
        if any(seeds):  # a resumed window: seed + first value, the order the uninterrupted run added them in
            self._device[names] += torch.tensor(seeds, dtype=torch.float64, device=stacked.device)

    def _running_max(self, key: str, value: Tensor | float) -> None:
        """Keep the larger of the running maximum and ``value`` (host floats stay on the host)."""
        prev = self._max.get(key)
        if prev is None:
            self._max[key] = value
        elif isinstance(prev, float) and isinstance(value, float):
            self._max[key] = max(prev, value)
        else:
            device = value.device if isinstance(value, Tensor) else prev.device  # type: ignore[union-attr]
            as_t = lambda v: torch.as_tensor(v, dtype=torch.float64, device=device)  # noqa: E731
            self._max[key] = torch.maximum(as_t(prev), as_t(value))

    @torch.no_grad()
    def update(self, decision: RoutingDecision, plan: DispatchPlan) -> None:
        """Fold one forward's decision and plan into the running sums."""
        probs_TE = decision.probs_TE.detach()
        T, K = decision.expert_ids_TK.shape
        self._add_host("tokens", T)
        self._add_host("forwards", 1)
        counts = plan.counts_E.detach()
        self._counts = counts.clone() if self._counts is None else self._counts.add_(counts)
        floats = {"entropy_sum": torch.special.entr(probs_TE.float()).sum()}
        floats.update({f"mean/{name}": loss for name, loss in decision.aux_losses.items()})
        self._add_device(tuple(floats), [v.float() for v in floats.values()])
        if decision.mask_TK is None:
            self._add_host("slots_used", T * K)
            self._add_host("routed", T * K)
            self._running_max("experts_per_token_max", float(K if T else 0))
        else:
            per_token_T = decision.mask_TK.sum(dim=1)
            self._add_device(("slots_used", "routed"), [per_token_T.sum(), plan.num_routed])
            self._running_max("experts_per_token_max", per_token_T.max().double() if T else 0.0)
        if decision.mask_TK is not None or plan.num_rows != T * K:
            self._add_device(("dropped",), [plan.num_dropped])
        for name, value in decision.extras.items():
            self._add_host(f"mean/{name}", value)

    def raw(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The raw (sum-reduced, max-reduced) float64 tensors, fresh each call, for a cross-rank
        all-reduce in place followed by ``summarize``. Empty before the first ``update``."""
        if self._counts is None:
            return {}, {}
        device = self._counts.device
        sums: dict[str, Tensor] = {"counts_E": self._counts.double()}
        sums.update({k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in {**self._carried, **self._host}.items()})
        for names, vec in self._device.items():
            for i, name in enumerate(names):
                sums[name] = sums[name] + vec[i] if name in sums else vec[i].clone()
        sums.setdefault("dropped", torch.zeros((), dtype=torch.float64, device=device))
        maxes = {k: torch.as_tensor(v, dtype=torch.float64, device=device).clone() for k, v in self._max.items()}
        return sums, maxes

    def load_raw(self, sums: dict[str, Tensor], maxes: dict[str, Tensor]) -> None:
        """Start over from ``raw()`` output (a resumed run's half-done log window). Each carried sum
        seeds its accumulator, so the window adds its values in the order an uninterrupted run
        does and logs the same bits. Reads the values on the host (once, at resume)."""
        self.reset()
        if "counts_E" not in sums:
            return
        self._counts = sums["counts_E"].round().long()
        self._carried = {k: float(v) for k, v in sums.items() if k != "counts_E"}
        self._max = {k: v.double().clone() for k, v in maxes.items()}

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
            "dead_fraction": float((counts == 0).double().mean()),
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
