"""Training engines: what owns the model's gradient sync, the optimizer step and the checkpoint files.

``engine=<name>`` picks ``conf/engine/<name>.yaml``, whose schema is the ``Config`` of the engine
registered here as ``<name>``. The trainer (launch/train.py) imports only this registry, talks to the
engine it builds only through the ``Engine`` interface below, and never compares engine names:

- ``native`` (launch/engines/native.py): moeforge's own loop pieces: ``parallel.apply_parallel``
  (ddp/fsdp/ep/fssdp), ``launch.optim`` AdamW + schedule, DCP checkpoints (launch/checkpoint.py).
- ``deepspeed`` (launch/engines/deepspeed.py): the same model, optimizer and schedule inside a
  ``deepspeed.initialize`` engine (ZeRO stage 0/1/2), DeepSpeed's own checkpoint files published
  with the native writer's atomic rename and SHA-256 manifest.

Each engine class carries its config (``Config``: a ``launch.config.EngineConfig`` holding that
engine's knobs, checked in its ``__post_init__``) and its rules across groups (``check_job``, run by
launch/job.py when a job is composed). Adding an engine: one file in this folder, one line in
``ENGINES``, one ``conf/engine/<name>.yaml``.

An engine module is imported on first use (``engine_class``); registering the config schemas
(launch/job.py) reads every engine's ``Config``, so every engine module is imported then. None of
them imports its framework at module level: the ``deepspeed`` package is imported only when an
``engine=deepspeed`` engine is built, so only runs that choose it need it installed (its ``Config``
and ``check_job`` work without it).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from moe.errors import ConfigError
from moe.registry import import_class

if TYPE_CHECKING:
    from launch.checkpoint import CheckpointWriter
    from launch.config import EngineConfig, JobConfig
    from moe.model import MoETransformer
    from parallel import Runtime

ENGINES: dict[str, str] = {
    "native": "launch.engines.native:NativeEngine",
    "deepspeed": "launch.engines.deepspeed:DeepSpeedEngine",
}
"""Engine name -> ``module:class``, imported on first use. The only place an engine name is looked up."""


class Engine(Protocol):
    """What the training loop asks of an engine, in the order it asks (one optimizer step).

    The class is built as ``cls(job, core, runtime, manifest)``; before that, ``cls.Config`` is the
    schema of ``conf/engine/<name>.yaml`` and ``cls.check_job(job)`` refuses what it does not run.
    """

    Config: ClassVar[type[EngineConfig]]
    """This engine's config (``job.engine``): its name and knobs, checked in ``__post_init__``."""

    model: nn.Module
    """What the loop calls for forward passes (the core model, or a wrapper around it)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    manifest: dict[str, Any]
    """The config a checkpoint records and a resume must match (``launch.checkpoint.check_compatible``)."""
    runtime: Runtime

    @staticmethod
    def check_job(job: JobConfig) -> None:
        """This engine's rules across config groups (``ConfigError`` naming the keys), before anything is built."""

    def zero_grad(self) -> None:
        """Drop the previous step's gradients."""

    def micro_batch(self, last: bool) -> AbstractContextManager[None]:
        """Forward and backward of one micro-batch run inside; ``last``: it ends the step's accumulation."""

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        """Backward of one micro-batch's mean loss; the step's gradient is that of the mean over ``micro_batches``."""

    def grad_norm(self) -> Tensor:
        """Finish the step's gradient reduction; the global gradient L2 norm before clipping (every rank the same)."""

    def step(self, ok: Tensor) -> None:
        """Clip (if the engine has not), update the weights where the device flag ``ok`` is true (a non-finite
        step changes no weight and no optimizer state), advance the learning-rate schedule either way."""

    def checkpoint_writer(self) -> CheckpointWriter:
        """The writer the loop saves through (``finish`` publishes a pending save)."""

    def save(self, writer: CheckpointWriter, step: int, trainer: dict[str, Any]) -> Path | None:
        """Checkpoint the engine's state and ``trainer`` (JSON-ready counters) as step ``step``."""

    def select_checkpoint(self) -> Path | None:
        """The newest checkpoint in ``checkpoint.dir`` this engine can resume from and that verifies."""

    def verify(self, path: Path) -> list[str]:
        """Problems with checkpoint ``path`` for this engine (empty: it verifies); the same on every rank."""

    def load(self, path: Path) -> dict[str, Any]:
        """Load checkpoint ``path`` into the model, optimizer and schedule; returns its trainer counters."""


def engine_class(name: str) -> type[Engine]:
    """The class registered as ``name`` (``ENGINES``); a ``ConfigError`` naming ``engine.name`` for an unknown one."""
    if name not in ENGINES:
        raise ConfigError(f"engine.name ({name!r}) is not a known engine; choose one of {sorted(ENGINES)} (engine=<name>)")
    return import_class(ENGINES[name])


def check_job(job: JobConfig) -> None:
    """The chosen engine's rules across config groups (``ConfigError`` naming the keys), before anything is built.

    ``job.engine`` must be that engine's ``Config``: an ``engine.name=<other>`` override keeps the
    schema of the engine group chosen, so it is refused here.
    """
    cls = engine_class(job.engine.name)
    if not isinstance(job.engine, cls.Config):
        raise ConfigError(f"engine.name ({job.engine.name!r}) names another engine than the engine group's "
                          f"({type(job.engine).__name__}); choose the engine with engine={job.engine.name}, not engine.name")
    cls.check_job(job)


def checkpoint_engine(manifest: dict[str, Any]) -> str:
    """The engine that wrote a checkpoint, from its manifest: ``engine.name``, else ``native`` (native
    manifests name no engine, so checkpoints from before engines existed read as native)."""
    return (manifest.get("engine") or {}).get("name", "native")


def build_engine(job: JobConfig, core: MoETransformer, runtime: Runtime, manifest: dict[str, Any]) -> Engine:
    """The engine of ``engine.name`` around the built single-device ``core`` (on ``runtime.device``).

    ``manifest``: the model-shaping config its checkpoints record (``launch.job.manifest_of``).
    """
    return engine_class(job.engine.name)(job, core, runtime, manifest)
