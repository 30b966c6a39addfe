"""Loss-spike detection and rollback with a data skip, without a host sync on ordinary steps.

A spike is a training step whose loss (the cross-entropy, averaged over ranks) is far above the
recent ones. The statistic is robust, so one earlier spike or a noisy batch does not move it:

    spike  <=>  loss_t > median(L) + k * max(1.4826 * MAD(L), 0.01 * median(L))

where ``L`` are the last ``train.spike_window`` losses that were not spikes themselves, MAD is the
median absolute deviation from the median (1.4826 x MAD estimates the standard deviation of
normal noise; Rousseeuw & Croux 1993), ``k = train.spike_threshold`` (default 6), and the floor of
1% of the median keeps a window of nearly equal losses from flagging ordinary noise. Detection starts
once ``L`` holds half a window. A non-finite loss or gradient norm is an event too when
``train.on_nonfinite=rollback``.

Sync-free: each step only keeps its loss and gradient norm as device tensors (``record``). At the
next log, evaluation or save the trainer calls ``settle``: one all-reduce of the pending losses and
one copy to the host, then the test above, step by step, on every rank alike (the same reduced
values), so every rank takes the same decision. A rollback may therefore start a few steps after
the spike; a checkpoint is always saved after a settle, so it never holds an undetected spike.

``train.on_spike``:

- ``off``: nothing; ``warn`` (default): one line and a W&B alert per spike;
- ``rollback``: reload the newest verified checkpoint at least ``spike_window`` steps older than the
  spike and not saved inside a spike window, delete the newer ones (their weights lead into the
  spike), and from that step on read ``train.skip_batches`` batches further ahead (PaLM, Chowdhery et
  al. 2022, §5.1: restart about 100 steps before the spike and skip 200-500 batches). The skip is a
  pure function of the recorded ``[step, count]`` pairs, the same on every rank and after a resume;
  ``train.data_skips`` tells a run the same skips in advance. After ``train.max_rollbacks`` the run
  stops with one line.

Every checkpoint records its loss window (``state``): the recent losses, the spikes seen in the last
``spike_window`` steps, the skips and the rollback count. One saved within ``spike_window`` steps
after a spike is inside the spike window: never a rollback target, and a resume from it says so.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from launch.checkpoint import LOSS_WINDOW, MANIFEST, published_checkpoints, step_of
from moe.errors import MoeforgeError
from parallel import Runtime

log = logging.getLogger("moeforge")

MAD_TO_SIGMA = 1.4826
"""1 / Phi^-1(3/4): the MAD of normal noise times this is its standard deviation."""
FLOOR = 0.01
"""The spread never counts as less than this fraction of the median."""


class SpikeError(MoeforgeError):
    """A rollback was needed but is not possible (no older checkpoint, or ``train.max_rollbacks`` reached)."""


@dataclass(frozen=True)
class SpikeEvent:
    step: int
    """1-based step whose loss spiked (or was not finite)."""
    loss: float
    median: float
    limit: float
    nonfinite: bool = False

    def describe(self) -> str:
        if self.nonfinite:
            return f"step {self.step}: the loss ({self.loss:.4g}) or the gradient norm was not finite"
        return f"loss spike at step {self.step}: {self.loss:.4f} > {self.limit:.4f} (median {self.median:.4f} of the recent losses)"


def spike_limit(window: list[float], threshold: float) -> tuple[float, float]:
    """(median, limit) of ``window``: a loss above ``limit`` is a spike (the module's formula)."""
    median = statistics.median(window)
    mad = statistics.median(abs(v - median) for v in window)
    return median, median + threshold * max(MAD_TO_SIGMA * mad, FLOOR * abs(median))


def batch_index(step: int, skips: list[list[int]]) -> int:
    """The training batch that 0-based ``step`` reads: ``step`` plus every skip recorded at or before it."""
    return step + sum(count for at, count in skips if step >= at)


class SpikeGuard:
    """Keeps the loss window, finds spikes at settle time, and records what a checkpoint needs."""

    def __init__(self, runtime: Runtime, policy: str, window: int, threshold: float, nonfinite_rollback: bool,
                 skips: list[list[int]] | None = None) -> None:
        self.runtime, self.policy, self.window, self.threshold = runtime, policy, window, threshold
        self.nonfinite_rollback = nonfinite_rollback
        self.losses: deque[tuple[int, float]] = deque(maxlen=window)
        self.spikes: list[list[float]] = []
        """[step, loss, non-finite 0/1] of recent events (kept for ``spike_window`` steps: a checkpoint saved then is inside a spike window)."""
        self.pending: list[tuple[int, Tensor, Tensor]] = []
        self.skips: list[list[int]] = [list(s) for s in (skips or [])]
        self.rollbacks = 0
        self.warned: list[SpikeEvent] = []
        """Spikes found by the last ``settle`` that call for no rollback (``warn``)."""

    @property
    def rolls_back(self) -> bool:
        return self.policy == "rollback" or self.nonfinite_rollback

    def record(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        """Keep 1-based ``step``'s loss (this rank's) and gradient norm; no host sync."""
        if self.policy != "off" or self.nonfinite_rollback:
            self.pending.append((step, loss.detach().double().reshape(()), grad_norm.detach().double().reshape(())))

    def settle(self) -> SpikeEvent | None:
        """Reduce the pending losses over ranks and test them in order (one host sync); the first event
        that calls for a rollback is returned, spikes under ``warn`` are only logged (and returned
        by ``warnings``)."""
        self.warned: list[SpikeEvent] = []
        if not self.pending:
            return None
        steps = [s for s, _, _ in self.pending]
        values = torch.stack([torch.stack([loss, norm]) for _, loss, norm in self.pending])
        self.pending = []
        self.runtime.all_reduce_sum_([values])  # a NaN/Inf on any rank stays NaN/Inf in the sum
        rows = (values / torch.tensor([self.runtime.world_size, 1.0], dtype=values.dtype, device=values.device)).tolist()
        for step, (loss, norm) in zip(steps, rows):
            event = self._test(step, loss, norm)
            if event is None:
                continue
            self.spikes.append([step, event.loss, int(event.nonfinite)])
            if (event.nonfinite and self.nonfinite_rollback) or (not event.nonfinite and self.policy == "rollback"):
                return event
            if not event.nonfinite:  # a skipped non-finite step was already told by the step guard
                self.warned.append(event)
        return None

    def _test(self, step: int, loss: float, norm: float) -> SpikeEvent | None:
        self.spikes = [s for s in self.spikes if s[0] > step - self.window]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return SpikeEvent(step, loss, math.nan, math.nan, nonfinite=True)
        if self.policy != "off" and len(self.losses) >= max(2, self.window // 2):
            median, limit = spike_limit([v for _, v in self.losses], self.threshold)
            if loss > limit:
                return SpikeEvent(step, loss, median, limit)
        self.losses.append((step, loss))
        return None

    def in_spike_window(self, step: int) -> list[float] | None:
        """[step, loss, non-finite 0/1] of the earliest spike or non-finite step within ``spike_window`` steps before
        ``step`` (1-based), or None: a checkpoint saved at ``step`` then is inside a spike window."""
        recent = [s for s in self.spikes if step - self.window < s[0] <= step]
        return recent[0] if recent else None

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint at 1-based ``step`` records (call after ``settle``)."""
        spike = self.in_spike_window(step)
        return {"losses": [[s, v] for s, v in self.losses], "spikes": [list(s) for s in self.spikes],
                "in_spike_window": spike is not None, "rollbacks": self.rollbacks, "data_skips": [list(s) for s in self.skips]}

    def load(self, state: dict[str, Any], told: list[list[int]]) -> None:
        """Restore ``state()`` output; the skips are the checkpoint's plus those ``told`` in the config."""
        self.losses.clear()
        self.losses.extend((int(s), float(v)) for s, v in state.get("losses", []))
        self.spikes = [list(s) for s in state.get("spikes", [])]
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skips = [list(s) for s in state.get("data_skips", [])]
        self.skips += [list(s) for s in told if list(s) not in self.skips]
        self.pending = []

    def batch_index(self, step: int) -> int:
        return batch_index(step, self.skips)


def saved_spike_state(path: Path) -> dict[str, Any]:
    """The loss window recorded in checkpoint ``path``'s manifest (any engine; ``{}`` when it holds none)."""
    try:
        found = json.loads((path / MANIFEST).read_text()).get(LOSS_WINDOW, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def rollback_target(directory: str | Path, before: int, runtime: Runtime, verify: Callable[[Path, Runtime], list[str]]) -> Path | None:
    """The newest published checkpoint at step <= ``before`` that verifies and was not saved inside a spike window."""
    candidates = [p for p in published_checkpoints(directory) if step_of(p) <= before and not saved_spike_state(p).get("in_spike_window")]
    for path in candidates:
        found = verify(path, runtime)
        if not found:
            return path
        log.warning(f"moeforge: checkpoint {path} failed verification: {found[0]}; trying the next older one")
    return None


def retire_newer(directory: str | Path, step: int, runtime: Runtime) -> list[str]:
    """Delete the published checkpoints newer than ``step`` (rank 0; renamed first, like pruning), so a
    restart never resumes into the weights that led to the spike; returns their names."""
    names = []
    if runtime.is_main:
        for path in published_checkpoints(directory):
            if step_of(path) > step:
                names.append(path.name)
                doomed = path.with_name(f"{path.name}.del-{uuid.uuid4().hex[:8]}")
                path.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    runtime.barrier()
    return names


def roll_back(event: SpikeEvent, guard: SpikeGuard, directory: str | Path, runtime: Runtime, max_rollbacks: int, skip_batches: int,
              told: list[list[int]], verify: Callable[[Path, Runtime], list[str]],
              restore: Callable[[Path], dict[str, Any]]) -> tuple[int, str]:
    """Roll back after ``event`` (every rank calls it): returns (the restored step, the one-line report).

    ``restore(path)`` loads a checkpoint into the trainer (model, optimizer, schedule, RNG, log
    window) and returns its trainer counters. Raises ``SpikeError`` (one line) when
    ``max_rollbacks`` are used up or no checkpoint old enough exists.
    """
    if guard.rollbacks >= max_rollbacks:
        raise SpikeError(f"{event.describe()}; giving up: {guard.rollbacks} rollback(s) already done (train.max_rollbacks={max_rollbacks}); "
                         f"lower optim.lr, check the data around these steps, or raise train.max_rollbacks")
    before = event.step - guard.window
    target = rollback_target(directory, before, runtime, verify)
    if target is None:
        raise SpikeError(f"{event.describe()}; no checkpoint in {directory} is older than the spike window (step <= {max(before, 0)}) "
                         f"and saved outside one, so there is nothing to roll back to; lower optim.lr, or start over with "
                         f"checkpoint.resume=never")
    retired = retire_newer(directory, step_of(target), runtime)
    count = guard.rollbacks + 1
    trainer = restore(target)
    guard.load(trainer.get("spike", {}), told)
    guard.rollbacks = count
    step = int(trainer["step"])
    first = guard.batch_index(step)
    guard.skips.append([step, skip_batches])
    gone = f"; deleted the newer {', '.join(retired)}" if retired else ""
    report = (f"{event.describe()}; rolled back to {target.name} (rollback {count} of at most {max_rollbacks}) and skipping "
              f"{skip_batches} batches ({first}..{first + skip_batches - 1}) from step {step + 1}{gone}")
    return step, report
