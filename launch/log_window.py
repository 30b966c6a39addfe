"""The running sums of one log window, carried in checkpoints so a resumed run logs what an uninterrupted one logs.

Between two log steps the trainer sums the training loss (``loss_sum``, ``count``) and every MoE
layer's routing statistics (``RoutingStats.raw()``). A run resumed at step S, in the middle of a
window, would otherwise report the window's mean over steps S+1.. only. So a checkpoint stores the
window's sums reduced over ranks (JSON floats: float64 round-trips exactly), and a resume puts them
back on rank 0 (zeros, or the max for max-reduced entries, on the other ranks): the next log step's
all-reduce then sees the same totals as without the interruption.

Throughput (``tokens_per_s``) is wall-clock and restarts with the process.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from moe.model import MoETransformer
from parallel import Runtime


class LogWindow:
    """Training-loss sum and count, tokens and start time of the current log window."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loss = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing throughput now (after a log step's evaluation and checkpoint)."""
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, ce: Tensor, tokens: int, finite: Tensor | bool = True) -> None:
        """Fold one training step in; a skipped (non-finite) step adds its tokens but not its loss.

        ``finite`` may be a device flag: it is applied on the device (no host read)."""
        one = torch.ones((), dtype=torch.float64, device=self.loss.device)
        term = torch.stack([ce.detach().double(), one])
        if isinstance(finite, Tensor):
            self.loss += torch.where(finite, term, torch.zeros_like(term))
        elif finite:
            self.loss += term
        self.tokens += tokens

    def take_loss(self) -> float:
        """The window's mean training loss over all ranks (NaN when every step was skipped); starts a new window."""
        self.runtime.all_reduce_sum_([self.loss])
        total, count = self.loss.tolist()
        mean = total / count if count > 0 else float("nan")
        self.loss.zero_()
        return mean

    def state(self, core: MoETransformer) -> dict[str, Any]:
        """The window's sums over all ranks, as JSON-ready lists (a collective: every rank calls it)."""
        loss = self.loss.clone()
        self.runtime.all_reduce_sum_([loss])
        layers: dict[str, Any] = {}
        for i, (sums, maxes) in core.routing_sums().items():  # fresh tensors: reducing them leaves the model's alone
            self.runtime.all_reduce_sum_(list(sums.values()))
            self.runtime.all_reduce_max_(list(maxes.values()))
            layers[str(i)] = {"sums": {k: v.tolist() for k, v in sums.items()}, "maxes": {k: v.tolist() for k, v in maxes.items()}}
        return {"loss": loss.tolist(), "routing": layers}

    def load(self, state: dict[str, Any], core: MoETransformer) -> None:
        """Restore ``state()`` output: totals on rank 0, zeros (sums) or the same max elsewhere."""
        main = self.runtime.is_main
        dev = self.loss.device
        self.loss.copy_(torch.tensor(state.get("loss", [0.0, 0.0]), dtype=torch.float64, device=dev) * (1.0 if main else 0.0))
        seeds = {}
        for i, entry in state.get("routing", {}).items():
            sums = {k: torch.tensor(v, dtype=torch.float64, device=dev) for k, v in entry["sums"].items()}
            maxes = {k: torch.tensor(v, dtype=torch.float64, device=dev) for k, v in entry["maxes"].items()}
            seeds[int(i)] = ({k: t if main else torch.zeros_like(t) for k, t in sums.items()}, maxes)
        core.load_routing_sums(seeds)
