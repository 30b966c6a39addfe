"""Distributed runtime: process groups / DeviceMesh, expert parallelism, FSSDP, FSDP2 / DDP.

The trainer talks to this package through these names only:

- ``ParallelConfig``: the ``parallel`` config group's schema (``parallel=none|ddp|fsdp|ep|fssdp``,
  ``parallel.ep_size``, ``parallel.dense=ddp|fsdp``, ``parallel.fssdp.*``).
- ``setup_runtime(cfg) -> Runtime``: reads the torchrun environment, initialises the process
  group (NCCL on GPUs, gloo on CPUs) and the DeviceMesh; single process when not under torchrun.
- ``apply_parallel(model, cfg, runtime) -> nn.Module``: rewires a built single-device model.
- ``Runtime``: rank facts plus the collectives the trainer needs (metric reduction, the
  gradient-norm for clipping, before/after optimizer-step hooks, communication bytes, teardown).
- ``checkpoint_state`` / ``load_checkpoint_state``: model + optimizer state in DCP form, experts
  saved under their global index, so a checkpoint written under one layout loads under another.

Modules: ``config`` (schema, layout rules), ``modes`` (the registry of parallel modes: one object
and file per ``parallel.mode``, the only place a mode's name is looked up), ``mesh`` (torchrun
env -> process group + mesh), ``comm`` (differentiable all-to-all, byte meter), ``token_exchange``
(rows to expert holders and back), ``expert_parallel``, ``fssdp`` + ``fssdp_plan`` +
``fssdp_config`` (Hecate), ``dense`` (DDP averaging, FSDP2), ``checkpoint``, ``runtime``
(``Runtime``, ``MeshInfo``), ``layout`` (``setup_runtime``, ``apply_parallel``).
"""

from __future__ import annotations

from parallel.checkpoint import checkpoint_state, load_checkpoint_state
from parallel.config import FSSDPConfig, ParallelConfig
from parallel.layout import apply_parallel, setup_runtime
from parallel.runtime import Runtime

__all__ = ["FSSDPConfig", "ParallelConfig", "Runtime", "apply_parallel", "checkpoint_state", "load_checkpoint_state", "setup_runtime"]
