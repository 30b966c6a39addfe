"""The trainer's two calls into the parallel package: ``setup_runtime`` and ``apply_parallel``.

``setup_runtime`` reads the torchrun environment and builds the process group and mesh that
``parallel.mode`` needs; ``apply_parallel`` hands a built single-device model to that mode's
object (``parallel.modes``), whose ``wrap`` rewires it. Both check the mode's rules first, so a
bad layout is refused before anything is built.
"""

from __future__ import annotations

from torch import nn

from moe.layer import MoELayer
from parallel.config import ParallelConfig
from parallel.heartbeat import start_heartbeat
from parallel.mesh import init_mesh
from parallel.modes import check_config, check_experts, parallel_mode
from parallel.runtime import Runtime


def setup_runtime(cfg: ParallelConfig, device: str = "auto") -> Runtime:
    """Read the torchrun environment, initialise the process group and mesh for ``cfg.mode`` on
    ``device`` (auto: CUDA when present; cpu; cuda)."""
    mode = check_config(cfg)
    info = init_mesh(cfg, device)
    heartbeat = start_heartbeat(cfg.heartbeat_s, info.rank, info.world_size, info.local_rank, info.local_world_size) if info.mesh is not None else None
    return Runtime(
        rank=info.rank,
        world_size=info.world_size,
        local_rank=info.local_rank,
        device=info.device,
        cfg=cfg,
        mesh=info if info.mesh is not None else None,
        heartbeat=heartbeat,
        replicated=mode.replicates_parameters,
    )


def apply_parallel(model: nn.Module, cfg: ParallelConfig, runtime: Runtime) -> nn.Module:
    """Rewire a built model (already on ``runtime.device``) for ``cfg.mode`` (its object's ``wrap``); refuses bad layouts."""
    mode = check_config(cfg)
    if not mode.distributed or runtime.mesh is None:
        return model
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        check_experts(cfg, runtime.world_size, layer.num_experts)
    runtime.install_count_sum(model)
    return mode.wrap(model, cfg, runtime, layers, parallel_mode(cfg.dense))
