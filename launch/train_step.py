"""One optimizer step of the training loop, queued on the device without reading anything back.

``TrainStep`` is the part of ``launch/train.py``'s loop that runs every step: gradients over the
micro-batches, reduction and the gradient norm, the device-side finiteness verdict
(``StepGuard.post``), the masked optimizer step, the parallel layout's and routers' per-step
bookkeeping, and the log window's running sums. In a step that neither logs, evaluates nor saves
none of it reads a device value on the host (``tools.bench.host_syncs`` counts, tests assert zero for
``parallel=none|ddp|fsdp|fssdp``; EP's all-to-all needs its split sizes on the host).

``forward_backward`` (the accumulation over micro-batches) and ``doc_ids`` live here, beside their
one caller in the loop; ``launch.train`` imports them for evaluation and the tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from launch import cuda_graphs
from launch.config import JobConfig
from launch.engines import Engine
from launch.log_window import LogWindow
from launch.step_guard import StepGuard, Verdict
from moe.model import MoETransformer
from parallel import Runtime


def doc_ids(tokens_BS: torch.Tensor, separator: int | None) -> torch.Tensor | None:
    """Document index of every position: it increases by one after each ``separator`` token."""
    if separator is None:
        return None
    ends = (tokens_BS == separator).long()
    return torch.cumsum(ends, dim=1) - ends


def forward_backward(engine: Engine, runtime: Runtime, x_BS: torch.Tensor, y_BS: torch.Tensor, step: int, job: JobConfig,
                     autocast: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate one optimizer step's gradients of ``engine.model`` over ``train.grad_accum`` micro-batches.

    Each micro-batch's loss is divided by their number, so the summed gradients are those of the
    mean over the whole batch; gradient communication runs only in the last backward. ``engine``
    owns both (``micro_batch``, ``backward``). Returns the step's mean cross-entropy and mean
    auxiliary losses (detached).
    """
    n, model = job.train.grad_accum, engine.model
    ce_total = torch.zeros((), device=runtime.device)
    aux_total: dict[str, torch.Tensor] = {}
    for j, (x, y) in enumerate(zip(x_BS.chunk(n), y_BS.chunk(n))):
        with engine.micro_batch(j == n - 1):
            with autocast:
                ce, aux = model(x, step=step, doc_ids_BS=doc_ids(x, job.data.doc_separator), targets_BS=y)
            loss = ce + sum(aux.values(), torch.zeros((), device=runtime.device))
            engine.backward(loss, n)
        ce_total += ce.detach()
        for name, value in aux.items():
            aux_total[name] = aux_total.get(name, 0.0) + value.detach()
    return ce_total / n, {name: value / n for name, value in aux_total.items()}


@dataclass
class StepOut:
    ce: Tensor
    """The step's mean cross-entropy (device, detached)."""
    aux: dict[str, Tensor]
    grad_norm: Tensor
    ok: Tensor
    """Device flag: the step was finite on every rank and updated the weights."""
    host: Verdict
    """Stop signal / lost agent, agreed over ranks this step."""


class TrainStep:
    """``step(i, x_BS, y_BS) -> StepOut``: one optimizer step of ``engine`` (see the module docstring)."""

    def __init__(self, job: JobConfig, engine: Engine, core: MoETransformer, runtime: Runtime, guard: StepGuard,
                 window: LogWindow, autocast: Any) -> None:
        self.job, self.engine, self.core, self.runtime = job, engine, core, runtime
        self.guard, self.window, self.autocast = guard, window, autocast

    def __call__(self, step: int, x_BS: Tensor, y_BS: Tensor) -> StepOut:
        engine, runtime = self.engine, self.runtime
        if self.job.train.cuda_graphs:
            cuda_graphs.mark_step()
        engine.zero_grad()
        ce, aux = forward_backward(engine, runtime, x_BS, y_BS, step, self.job, self.autocast)
        loss = ce + sum(aux.values(), torch.zeros((), device=runtime.device))
        with record_function("moeforge.grad_clip"):  # launch/profiling.py classes what runs inside by these names
            grad_norm = engine.grad_norm()
        ok = self.guard.post(step, loss, grad_norm)
        host = self.guard.host()
        with record_function("moeforge.optimizer"):
            engine.step(ok)
        runtime.after_optimizer_step(engine.model, engine.optimizer, step)
        runtime.all_reduce_sum_(self.core.router_step_sums())
        self.core.after_step(step)
        self.window.add(ce, x_BS.numel() * runtime.world_size, ok)
        return StepOut(ce, aux, grad_norm, ok, host)
