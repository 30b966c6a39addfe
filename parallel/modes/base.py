"""What a parallel mode is: the facts the rest of moeforge asks of a layout, and how it wires a model.

A ``ParallelMode`` answers every question that used to be a comparison of ``parallel.mode`` with
a name: does it need a process group (``distributed``), is every parameter whole on every rank
(``replicates_parameters``), do ranks hold different experts (``splits_experts``), are
parameters sharded and gathered where used (``gathers_parameters``), can ``parallel.dense`` name
it (``places_dense``), which key sizes its expert group (``group_size_key``), why CUDA graphs
cannot capture its step (``capture_refusal``). ``wrap`` rewires a built single-device model for
the mode (``parallel.layout.apply_parallel`` calls it). ``SplitExperts`` is the shared shape of
the modes that spread experts over ranks and leave the dense parameters to ``parallel.dense``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moe.errors import check

if TYPE_CHECKING:
    from moe.layer import MoELayer
    from parallel.config import ParallelConfig
    from parallel.runtime import Runtime


class ParallelMode:
    """One value of ``parallel.mode`` (``conf/parallel/<name>.yaml``), registered in ``parallel.modes``."""

    name: str = ""
    """The ``parallel.mode`` value that selects this mode."""
    distributed: bool = True
    """Runs with a process group and a DeviceMesh (in one process too); False: one process, no group."""
    replicates_parameters: bool = False
    """Every parameter and gradient is a whole plain tensor on every rank (in one process, torch's own
    ``clip_grad_norm_`` is then exact)."""
    splits_experts: bool = False
    """Ranks hold different experts and exchange routed rows; ``parallel.dense`` places the rest."""
    gathers_parameters: bool = False
    """Parameters are sharded over ranks and all-gathered where they are used."""
    places_dense: bool = False
    """``parallel.dense`` may name this mode to place the dense parameters of a mode that splits experts."""
    group_size_key: str | None = None
    """The config key that sizes this mode's expert group (None: no such key)."""
    capture_refusal: str | None = None
    """Why ``train.cuda_graphs=true`` cannot capture this mode's step (the words after ``parallel=<name>``);
    None when it can."""

    def expert_group_size(self, cfg: ParallelConfig, world_size: int) -> int:
        """Ranks among which every expert is held once; ``world_size // this`` groups are replicas."""
        return world_size

    def needs_expert_mesh(self, cfg: ParallelConfig, world_size: int) -> bool:
        """Whether the runtime builds the 2-D ``("edp", "ep")`` mesh of ``expert_group_size`` groups."""
        return False

    def check_world(self, cfg: ParallelConfig, world_size: int) -> None:
        """Refuse a layout that does not fit ``world_size`` ranks (before anything is built)."""

    def check_experts(self, cfg: ParallelConfig, world_size: int, num_experts: int) -> None:
        """Refuse a layout that does not fit the model's ``num_experts``."""

    def wrap(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer], dense: ParallelMode) -> nn.Module:
        """Rewire ``model`` (its MoE ``layers`` listed) for this mode on ``runtime``'s mesh; ``dense`` is the
        mode ``parallel.dense`` names, which a mode that splits experts hands its other parameters."""
        raise NotImplementedError(f"parallel.mode={self.name} does not wrap a model")

    def wrap_dense(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, experts: set[nn.Parameter]) -> None:
        """Make every parameter of ``model`` outside ``experts`` data-parallel (``places_dense`` modes)."""
        raise NotImplementedError(f"parallel.mode={self.name} cannot place dense parameters")


class SplitExperts(ParallelMode):
    """A mode whose ranks hold different experts: ``split`` spreads them; the dense parameters go to
    the mode ``parallel.dense`` names, and expert gradients are summed over the group's replicas."""

    splits_experts = True

    def split(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer]) -> int:
        """Spread the experts of ``layers`` over their group; returns the group's size."""
        raise NotImplementedError

    def needs_expert_mesh(self, cfg: ParallelConfig, world_size: int) -> bool:
        return self.expert_group_size(cfg, world_size) < world_size

    def check_world(self, cfg: ParallelConfig, world_size: int) -> None:
        size, key = self.expert_group_size(cfg, world_size), str(self.group_size_key)
        check(size <= world_size, key, size, f"must be <= the world size ({world_size})")
        check(world_size % size == 0, key, size, f"must divide the world size ({world_size})")

    def wrap(self, model: nn.Module, cfg: ParallelConfig, runtime: Runtime, layers: list[MoELayer], dense: ParallelMode) -> nn.Module:
        group_size = self.split(model, cfg, runtime, layers)
        runtime.expert_replicas = runtime.world_size // group_size
        runtime.expert_group = runtime.mesh.group("edp") if runtime.expert_replicas > 1 else None
        runtime.expert_modules = [layer.experts for layer in layers]
        dense.wrap_dense(model, cfg, runtime, set(runtime.expert_params()))
        return model
