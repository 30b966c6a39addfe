"""Per-step guards every rank agrees on: non-finite loss or gradient norm, stop signals, a lost agent.

After backward and gradient clipping, and before the optimizer step, ``StepGuard.check`` packs four
flags (this rank's loss is not finite, the gradient norm is not finite, the stop signal received,
this worker's torchrun agent is gone) into one tensor and takes its max over ranks: one small
all-reduce per step (none in one process), so every rank takes the same branch and none is left
waiting in a collective. A non-finite step then either stops the run before anything is updated
or saved (``train.on_nonfinite=stop``, the default) or is skipped: no optimizer update, the step
still counts, at most ``train.max_consecutive_skips`` in a row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from launch.preemption import AgentWatch, StopSignals
from moe.errors import MoeforgeError
from parallel import Runtime

log = logging.getLogger("moeforge")


class NonFiniteError(MoeforgeError):
    """The loss or the gradient norm was NaN/Inf and the policy (or the skip limit) says stop."""


@dataclass(frozen=True)
class Verdict:
    nonfinite: bool
    signum: int
    """The stop signal some rank received (0: none)."""
    agent_gone: bool


class StepGuard:
    """Agrees on each step's verdict across ranks and applies ``train.on_nonfinite``."""

    def __init__(self, runtime: Runtime, on_nonfinite: str, max_consecutive_skips: int, signals: StopSignals, agent: AgentWatch) -> None:
        self.runtime, self.policy, self.max_skips = runtime, on_nonfinite, max_consecutive_skips
        self.signals, self.agent = signals, agent
        self.consecutive = 0
        self.skipped_total = 0

    def check(self, loss: Tensor | None = None, grad_norm: Tensor | None = None) -> Verdict:
        """The agreed verdict for this step (``loss``/``grad_norm`` None: only signals and agent)."""
        dev = self.runtime.device
        bad_loss = ~torch.isfinite(loss.detach().float()) if loss is not None else torch.zeros((), dtype=torch.bool, device=dev)
        bad_norm = ~torch.isfinite(grad_norm.detach().float()) if grad_norm is not None else torch.zeros((), dtype=torch.bool, device=dev)
        others = torch.tensor([float(self.signals.received or 0), float(self.agent.gone())], device=dev)
        flags = torch.cat([torch.stack([bad_loss, bad_norm]).to(dev).float(), others])
        self.runtime.all_reduce_max_([flags])
        nonfinite_loss, nonfinite_norm, signum, gone = flags.tolist()
        return Verdict(nonfinite=bool(nonfinite_loss or nonfinite_norm), signum=int(signum), agent_gone=bool(gone))

    def on_nonfinite(self, step: int, loss: Tensor, grad_norm: Tensor, last_saved: str, resumed_at: int | None = None) -> None:
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


def _fmt(t: Tensor) -> str:
    v = float(t.detach().float())
    return f"{v:.4g}" if math.isfinite(v) else str(v)
