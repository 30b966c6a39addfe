"""``parallel=fssdp``: experts owned once per FSSDP group and sparsely gathered where routing needs
them (Hecate, Qing et al. 2025; ``parallel.fssdp``); the dense parameters are placed by ``parallel.dense``.

With ``parallel.fssdp.shard_size`` S below the world size W, each of the W / S groups of
consecutive ranks holds every expert once and the groups are replicas (hybrid sharding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from parallel.fssdp import FSSDPRunner, FSSDPState
from parallel.modes.base import SplitExperts

if TYPE_CHECKING:
    from moe.layer import MoELayer
    from parallel.config import ParallelConfig
    from parallel.runtime import Runtime


class FullyShardedSparse(SplitExperts):
    """Hecate's FSSDP: owner-only experts, sparse all-gather (spAG) before use, sparse reduce-scatter after."""

    name = "fssdp"
    gathers_parameters = True
    group_size_key = "parallel.fssdp.shard_size"
    capture_refusal = ("cannot be captured (routed rows are exchanged between expert holders with split sizes read on the "
                       "host, and each step's placement is planned on the host)")

    def expert_group_size(self, cfg: ParallelConfig, world_size: int) -> int:
        """``parallel.fssdp.shard_size``, or the whole world when 0."""
        return cfg.fssdp.shard_size if cfg.fssdp.shard_size > 0 else world_size

    def split(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer]) -> int:
        """Over the world, or inside groups of shard_size ranks replicated across groups."""
        info = runtime.mesh
        dp_group = info.group("dp")
        hybrid = info.ep_mesh is not None
        shard_group = info.group("ep") if hybrid else dp_group
        shard_rank = info.ep_mesh.get_local_rank("ep") if hybrid else runtime.rank
        state = FSSDPState(cfg.fssdp, shard_group, shard_rank, info.ep_size if hybrid else runtime.world_size, info.local_world_size,
                           runtime.meter, plan_group=dp_group)
        for layer in layers:
            runner = FSSDPRunner(state, state.add_layer(layer.experts))
            layer.experts.expert_group = shard_group  # owner-only: each expert lives once per group
            layer.runner = runner
            if cfg.fssdp.prefetch:  # overlap the gather with the attention that precedes the layer
                prefetch_before_block(model, layer, runner)
        runtime.fssdp = state
        return state.world


def prefetch_before_block(model: nn.Module, layer: MoELayer, runner: FSSDPRunner) -> None:
    """Start ``runner``'s gather when the block whose ``ffn`` is ``layer`` begins (before its attention)."""
    for block in model.modules():
        if getattr(block, "ffn", None) is layer:
            block.register_forward_pre_hook(lambda _m, _a, runner=runner: runner.prefetch())
