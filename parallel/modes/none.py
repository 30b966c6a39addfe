"""``parallel=none``: one process, no process group; the model runs as built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from parallel.modes.base import ParallelMode

if TYPE_CHECKING:
    from moe.layer import MoELayer
    from parallel.config import ParallelConfig
    from parallel.runtime import Runtime


class SingleProcess(ParallelMode):
    """One process holding every parameter; torchrun with more than one rank is refused."""

    name = "none"
    distributed = False
    replicates_parameters = True

    def wrap(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer], dense: ParallelMode) -> nn.Module:
        return model
