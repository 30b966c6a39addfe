"""``parallel=ddp``: every parameter replicated; gradients averaged over all ranks (``dense.GradAverager``).

Also ``parallel.dense=ddp``: the dense parameters of a mode that splits experts, replicated the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from parallel.dense import GradAverager
from parallel.modes.base import ParallelMode

if TYPE_CHECKING:
    from moe.layer import MoELayer
    from parallel.config import ParallelConfig
    from parallel.runtime import Runtime


class DataParallel(ParallelMode):
    """Replicated parameters, bucketed gradient all-reduce over the ``dp`` group (overlapped with backward)."""

    name = "ddp"
    replicates_parameters = True
    places_dense = True

    def wrap(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer], dense: ParallelMode) -> nn.Module:
        self.wrap_dense(model, cfg, runtime, set())
        return model

    def wrap_dense(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, experts: set[nn.Parameter]) -> None:
        dense = [p for p in model.parameters() if p not in experts]
        runtime.dense_sync = GradAverager(dense, runtime.mesh.group("dp"), cfg.bucket_mb, runtime.meter, "dense_allreduce",
                                          overlap=cfg.overlap_grad_reduce, host_max=runtime.all_reduce_host_max_)
