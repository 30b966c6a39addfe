"""One optimizer step of the training loop, queued on the device without reading anything back.

``TrainStep`` is the part of ``launch/train.py``'s loop that runs every step: gradients over the
micro-batches, reduction and the gradient norm, the device-side finiteness verdict
(``StepGuard.post``), the masked optimizer step, the parallel layout's and routers' per-step
bookkeeping, and the log window's running sums. In a step that neither logs, evaluates nor saves
none of it reads a device value on the host (``tools.host_syncs`` counts, tests assert zero for
``parallel=none|ddp|fsdp|fssdp``; EP's all-to-all needs its split sizes on the host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from launch import cuda_graphs
from launch.config import JobConfig
from launch.engines import Engine
from launch.log_window import LogWindow
from launch.step_guard import StepGuard, Verdict
from moe.model import MoETransformer
from parallel import Runtime


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
        from launch.train import forward_backward  # the loop's own accumulation (one definition)

        engine, runtime = self.engine, self.runtime
        if self.job.train.cuda_graphs:
            cuda_graphs.mark_step()
        engine.zero_grad()
        ce, aux = forward_backward(engine.model, runtime, x_BS, y_BS, step, self.job, self.autocast, engine)
        loss = ce + sum(aux.values(), torch.zeros((), device=runtime.device))
        grad_norm = engine.grad_norm()
        ok = self.guard.post(step, loss, grad_norm)
        host = self.guard.host()
        engine.step(ok)
        runtime.after_optimizer_step(engine.model, engine.optimizer, step)
        runtime.all_reduce_sum_(self.core.router_step_sums())
        self.core.after_step(step)
        self.window.add(ce, x_BS.numel() * runtime.world_size, ok)
        return StepOut(ce, aux, grad_norm, ok, host)
