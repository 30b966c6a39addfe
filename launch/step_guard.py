"""Per-step guards every rank agrees on: non-finite loss or gradient norm, stop signals, a lost agent.

Nothing here makes the host wait for the device in a step that neither logs, evaluates nor saves:

- Host facts (a stop signal received, this worker's torchrun agent gone) are host values: ``host``
  takes their max over ranks through a gloo all-reduce of a CPU tensor (no device involved), every
  step, so every rank sees a signal or a lost agent in the same step and takes the same branch.
- Device facts (the loss or the gradient norm is NaN/Inf) stay on the device: ``post`` turns them
  into a bool tensor ``ok`` (max over ranks by one small device all-reduce), which the optimizer
  step obeys without the host reading it (``launch.masked_update``: a non-finite step changes no
  weight and no optimizer state). ``post`` also queues a copy of (non-finite, loss, gradient norm)
  into a host buffer. ``settle(step)`` reads those copies for every step up to ``step`` and applies
  ``train.on_nonfinite``: the trainer settles the previous step at the end of each step (on a GPU
  that waits only for a step the device has already finished or is finishing, while the current
  step's kernels keep it busy), and the current one before it logs, evaluates or saves. So a
  non-finite step stops the run (``stop``, the default) at most one step later, with the message
  naming it, and never reaches a checkpoint; with ``skip`` it is counted and warned about, at most
  ``train.max_consecutive_skips`` in a row.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from parallel.host_memory import mark_host
from launch.preemption import AgentWatch, StopSignals
from moe.errors import MoeforgeError
from parallel import Runtime

log = logging.getLogger("moeforge")


class AgentLostError(MoeforgeError):
    """This torchrun worker's agent is gone; it stops without writing (a relaunch may be running)."""


class NonFiniteError(MoeforgeError):
    """The loss or the gradient norm was NaN/Inf and the policy (or the skip limit) says stop."""


@dataclass(frozen=True)
class Verdict:
    nonfinite: bool
    signum: int
    """The stop signal some rank received (0: none)."""
    agent_gone: bool


@dataclass
class _Posted:
    step: int
    values: Tensor
    """Host buffer: (non-finite on some rank, this rank's loss, gradient norm)."""
    ready: torch.cuda.Event | None


class StepGuard:
    """Agrees on each step's verdict across ranks and applies ``train.on_nonfinite``."""

    def __init__(self, runtime: Runtime, on_nonfinite: str, max_consecutive_skips: int, signals: StopSignals, agent: AgentWatch) -> None:
        self.runtime, self.policy, self.max_skips = runtime, on_nonfinite, max_consecutive_skips
        self.signals, self.agent = signals, agent
        self.consecutive = 0
        self.skipped_total = 0
        self.last_bad = -1
        """The last step (0-based) settled as non-finite (-1: none)."""
        self._posted: deque[_Posted] = deque()

    def host(self) -> Verdict:
        """Stop signal and lost agent, max over ranks (a gloo all-reduce of host values; no device read)."""
        flags = mark_host(torch.tensor([float(self.signals.received or 0), float(self.agent.gone())]))
        self.runtime.all_reduce_host_max_(flags)
        signum, gone = flags.tolist()
        return Verdict(nonfinite=False, signum=int(signum), agent_gone=bool(gone))

    def post(self, step: int, loss: Tensor, grad_norm: Tensor) -> Tensor:
        """Step ``step``'s finiteness as a 0-dim bool tensor on the device (true on every rank only when all are
        finite); queues its values for ``settle``. Nothing is read on the host."""
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        bad = (~torch.isfinite(values)).any().float().reshape(1)
        self.runtime.all_reduce_max_([bad])
        ok = bad[0] == 0
        dev = values.device
        if dev.type == "meta":  # counted, not run (tools.bench.step_budget): there are no values to read back
            return ok
        buf = torch.empty(3, dtype=torch.float32, pin_memory=dev.type == "cuda")
        buf.copy_(torch.cat([bad, values]), non_blocking=dev.type == "cuda")
        event = None
        if dev.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._posted.append(_Posted(step, mark_host(buf), event))
        return ok

    def settle(self, through: int, last_saved: Callable[[], str], resumed_at: int | None = None,
               before_stop: Callable[[], None] = lambda: None) -> None:
        """Read the verdicts of every posted step up to ``through`` and apply the policy to each in order.

        ``last_saved``: the newest checkpoint, for the message; ``before_stop`` runs before a
        ``NonFiniteError`` is raised or a skip is recorded (the trainer publishes a pending async save of an
        earlier, finite step there)."""
        while self._posted and self._posted[0].step <= through:
            posted = self._posted.popleft()
            if posted.ready is not None:
                posted.ready.synchronize()
            bad, loss, norm = posted.values.tolist()
            if bad:
                before_stop()
                self.last_bad = posted.step
                self.on_nonfinite(posted.step, loss, norm, last_saved(), resumed_at)
            else:
                self.on_finite()

    def check(self, loss: Tensor | None = None, grad_norm: Tensor | None = None) -> Verdict:
        """The agreed verdict now, read at once (start-up, tests): ``post`` and ``host`` in one call."""
        host = self.host()
        if loss is None or grad_norm is None:
            return host
        ok = self.post(-1, loss, grad_norm)
        self._posted.pop()
        return Verdict(nonfinite=not bool(ok), signum=host.signum, agent_gone=host.agent_gone)

    def on_nonfinite(self, step: int, loss: Tensor | float, grad_norm: Tensor | float, last_saved: str, resumed_at: int | None = None) -> None:
        """Stop (raise ``NonFiniteError``) or record a skipped step, by policy and limit.

        ``resumed_at``: the step this process resumed at; a first step that is already non-finite
        gets a hint that the checkpoint itself may hold diverged (finite but useless) weights.
        """
        what = f"step {step + 1}: loss {_fmt(loss)}, gradient norm {_fmt(grad_norm)} (rank {self.runtime.rank})"
        self.consecutive += 1
        if self.policy == "stop" or self.consecutive > self.max_skips:
            why = (f"{self.consecutive - 1} steps in a row were already skipped (train.max_consecutive_skips={self.max_skips})"
                   if self.policy == "skip" else "train.on_nonfinite=stop")
            hint = ("Lower optim.lr or check the data, or set train.on_nonfinite=skip to skip such steps" if resumed_at != step else
                    f"This is the first step after resuming from {last_saved}, whose weights may already have diverged: "
                    f"start over with checkpoint.resume=never (or another checkpoint.dir) and a lower optim.lr")
            raise NonFiniteError(f"{what} is not finite; stopped before the optimizer step ({why}), nothing saved after {last_saved}. {hint}")
        self.skipped_total += 1
        log.warning(f"moeforge: {what} is not finite; update skipped ({self.consecutive} in a row, at most "
                    f"train.max_consecutive_skips={self.max_skips})")

    def on_finite(self) -> None:
        self.consecutive = 0


def _fmt(t: Tensor | float) -> str:
    v = float(t.detach().float()) if isinstance(t, Tensor) else float(t)
    return f"{v:.4g}" if math.isfinite(v) else str(v)
