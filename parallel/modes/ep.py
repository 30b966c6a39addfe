"""``parallel=ep``: experts split over expert-parallel groups of ``parallel.ep_size`` ranks (``expert_parallel``).

Routed rows travel to their expert's rank and back by all-to-all; the dense parameters are placed
by ``parallel.dense``; expert gradients are summed over the expert-data-parallel group (the ranks
holding the same experts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moe.errors import check
from parallel.expert_parallel import apply_expert_parallel
from parallel.modes.base import SplitExperts

if TYPE_CHECKING:
    from moe.layer import MoELayer
    from parallel.config import ParallelConfig
    from parallel.runtime import Runtime


class ExpertParallel(SplitExperts):
    """Each EP group of consecutive ranks holds every expert once, ``num_experts / ep_size`` per rank."""

    name = "ep"
    group_size_key = "parallel.ep_size"
    capture_refusal = ("cannot be captured (its all-to-all takes per-layer split sizes read on the host from the routing, a "
                       "data-dependent shape)")

    def expert_group_size(self, cfg: ParallelConfig, world_size: int) -> int:
        """``parallel.ep_size``, or the whole world when 0."""
        return cfg.ep_size if cfg.ep_size > 0 else world_size

    def needs_expert_mesh(self, cfg: ParallelConfig, world_size: int) -> bool:
        return True

    def check_experts(self, cfg: ParallelConfig, world_size: int, num_experts: int) -> None:
        ep = self.expert_group_size(cfg, world_size)
        check(num_experts % ep == 0, "parallel.ep_size", ep, f"must divide model.num_experts ({num_experts})")

    def split(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer]) -> int:
        info = runtime.mesh
        apply_expert_parallel(layers, info.group("ep"), info.ep_mesh.get_local_rank("ep"), info.ep_size, runtime.meter)
        return info.ep_size
