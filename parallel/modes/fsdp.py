"""``parallel=fsdp``: every parameter (experts included, sharded on the expert dim) FSDP2-sharded.

Also ``parallel.dense=fsdp``: the dense parameters of a mode that splits experts, sharded the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from parallel.dense import apply_fsdp
from parallel.modes.base import ParallelMode

if TYPE_CHECKING:
    from moe.layer import MoELayer
    from parallel.config import ParallelConfig
    from parallel.runtime import Runtime


class FullySharded(ParallelMode):
    """``fully_shard`` over the ``dp`` mesh: parameters all-gathered around each block, gradients reduce-scattered."""

    name = "fsdp"
    gathers_parameters = True
    places_dense = True
    capture_refusal = ("is not supported (FSDP2 all-gathers and frees parameters in hooks around each block, outside the "
                       "captured graphs); use parallel=ddp or none")

    def wrap(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer], dense: ParallelMode) -> nn.Module:
        self.wrap_dense(model, cfg, runtime, set())
        return model

    def wrap_dense(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, experts: set[nn.Parameter]) -> None:
        runtime.fsdp_units = apply_fsdp(model, runtime.mesh.mesh, experts)
