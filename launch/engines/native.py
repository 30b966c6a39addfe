"""The native engine: moeforge's own data/expert parallelism, AdamW and DCP checkpoints.

Each call is what ``launch/train.py`` did inline before engines existed, in the same order, so a
native run is bit-identical to one before the seam: ``apply_parallel`` wires the layout
(``parallel=none|ddp|fsdp|ep|fssdp``), ``launch.optim.build_optimizer`` builds AdamW and its
schedule, ``Runtime.grad_sync`` / ``before_optimizer_step`` / ``clip_grad_norm_`` reduce and clip,
and checkpoints are DCP (launch/checkpoint.py: tensors-only shards, ``objects.json``, per-rank RNG,
SHA-256 manifest, atomic publish), resumable under another world size or layout.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from launch.checkpoint import CheckpointWriter, load_checkpoint, select_checkpoint, verify_checkpoint
from launch.config import EngineConfig, JobConfig
from launch.kernel_adamw import KernelAdamW
from launch.masked_update import clip_scale, masked_step, takes_found_inf
from launch.optim import build_optimizer
from parallel import Runtime, apply_parallel, checkpoint_state, load_checkpoint_state


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, runtime: Runtime, trainer: dict[str, Any]) -> dict[str, Any]:
    """What a native checkpoint holds: model and optimizer (DCP form), LR schedule, trainer counters."""
    return {**checkpoint_state(model, optimizer, runtime), "scheduler": scheduler.state_dict(), "trainer": trainer}


@dataclass(kw_only=True)
class NativeConfig(EngineConfig):
    """``engine=native``: no knobs of its own (the layout is ``parallel``, the optimizer ``optim``)."""

    name: str = "native"


class NativeEngine:
    """``engine=native``: every parallel mode, the trainer's own optimizer step and DCP checkpoints."""

    Config = NativeConfig

    def __init__(self, job: JobConfig, core: nn.Module, runtime: Runtime, manifest: dict[str, Any]) -> None:
        self.job, self.runtime, self.manifest = job, runtime, manifest
        # ``model`` may rewire ``core`` in place (ep/fssdp runners, FSDP2); it stays the same module.
        self.model = apply_parallel(core, job.parallel, runtime)
        # optim.master_weights: the optimizer takes fp32 masters of the expert weights, then the model holds them in bf16.
        masters = core.expert_weights() if job.optim.master_weights else None
        self.optimizer, self.scheduler = build_optimizer(self.model, job, masters=masters)
        self.fold_clip = takes_found_inf(self.optimizer)
        """Fused AdamW clips inside its own kernel (``launch.masked_update``): no separate pass over the gradients."""
        self._grad_scale: Tensor | None = None

    @staticmethod
    def check_job(job: JobConfig) -> None:
        """Every combination of the other groups is the native engine's to run."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batch(self, last: bool) -> AbstractContextManager[None]:
        """Gradient communication only in the step's last backward (``Runtime.grad_sync``, DDP's ``no_sync``)."""
        return self.runtime.grad_sync(self.model, enabled=last)

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        """Backward of ``loss / micro_batches``: summed over the micro-batches, the gradient of the step's mean loss."""
        (loss / micro_batches if micro_batches > 1 else loss).backward()

    def grad_norm(self) -> Tensor:
        """Reduce (ddp averaging, expert sums and 1/W), then clip to ``optim.grad_clip`` (or hand the clipping
        to fused AdamW's ``grad_scale``); the norm before clipping."""
        self.runtime.before_optimizer_step(self.model)
        if self.fold_clip:
            norm = self.runtime.total_grad_norm(self.model)
            self._grad_scale = clip_scale(norm, self.job.optim.grad_clip)
            return norm
        return self.runtime.clip_grad_norm_(self.model, self.job.optim.grad_clip)

    def step(self, ok: Tensor) -> None:
        """The update where ``ok`` (a device flag, never read here), then the schedule advances either way."""
        masked_step(self.optimizer, ok, self._grad_scale)
        self._grad_scale = None
        self.scheduler.step()

    def checkpoint_writer(self) -> CheckpointWriter:
        c = self.job.checkpoint
        return CheckpointWriter(c.dir, self.runtime, c.keep, self.manifest, c.async_save)

    def save(self, writer: CheckpointWriter, step: int, trainer: dict[str, Any]) -> Path | None:
        return writer.save(step, training_state(self.model, self.optimizer, self.scheduler, self.runtime, trainer))

    def select_checkpoint(self) -> Path | None:
        return select_checkpoint(self.job.checkpoint.dir, self.runtime)

    def verify(self, path: Path) -> list[str]:
        return verify_checkpoint(path, self.runtime)

    def load(self, path: Path) -> dict[str, Any]:
        state = training_state(self.model, self.optimizer, self.scheduler, self.runtime, {"step": 0})
        load_checkpoint(path, state, self.runtime)
        load_checkpoint_state(self.model, self.optimizer, state, self.runtime)
        if isinstance(self.optimizer, KernelAdamW):  # the expert weights were loaded into their masters
            self.optimizer.params_from_masters()
        self.scheduler.load_state_dict(state["scheduler"])
        return state["trainer"]

