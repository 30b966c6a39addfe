"""``engine=deepspeed parallel=ep``: moeforge's expert parallelism told to DeepSpeed in DeepSpeed's own terms.

DeepSpeed-MoE (Rajbhandari et al. 2022, "DeepSpeed-MoE: Advancing Mixture-of-Experts Inference
and Training to Power Next-Generation AI Scale", §4.1 and §5) trains experts with expert
parallelism and data parallelism over the expert-data-parallel groups, ZeRO included. DeepSpeed
knows which parameters are experts from four marks; each is set here through DeepSpeed's API:

1. **Groups**: ``deepspeed.utils.groups._create_expert_and_data_parallel(ep_size)`` makes the
   group named ``ep_size_<ep>``: expert-parallel groups of ``ep`` consecutive ranks
   (``[0, 1], [2, 3]`` for 4 ranks and ep 2: the all-to-all runs there) and strided
   expert-data-parallel groups (``[0, 2], [1, 3]``: ranks holding the same experts). moeforge's
   ``ExpertParallelRunner`` is installed on DeepSpeed's expert-parallel group
   (``parallel.expert_parallel.apply_expert_parallel``, the same call ``parallel=ep`` makes
   under the native engine with its own mesh of the same layout).
2. **Parameters**: each expert weight gets ``allreduce = False`` and ``group_name`` (what
   ``deepspeed.moe.experts.Experts`` sets on its experts; ``deepspeed.moe.utils.is_moe_param``
   reads it). DeepSpeed then broadcasts experts only within their expert-data-parallel group at
   start-up and reduces their gradients there, divided by the whole data-parallel size as for
   dense gradients (``_reduce_expert_gradients``; ZeRO's ``average_tensor``).
3. **Optimizer groups**: ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
   moves the experts into ``moe: True`` groups (keeping their weight decay). ZeRO stage 1/2
   partitions those groups' fp32 weights, gradients and AdamW moments over the expert-data-parallel
   group instead of the world (``stage_1_and_2._configure_moe_settings``).
4. **Detection**: ``DeepSpeedEngine`` turns its MoE handling on (``has_moe_layers``) only when a
   module is an instance of ``deepspeed.moe.layer.MoE`` (``_configure_distributed_model``). While
   ``deepspeed.initialize`` runs, each moeforge ``Experts`` module is given a class deriving from
   both its own class and ``MoE`` (``seen_as_deepspeed_moe``), then its own class back. Its
   forward, parameters and state dict never change.

Why the class goes back: DeepSpeed's MoE checkpoint code reads per-expert submodules named
``deepspeed_moe.experts.deepspeed_experts.<i>``, while moeforge stacks a layer's experts in one
tensor. With the class restored, ``save_checkpoint`` writes the module file from data-parallel
rank 0 (the dense weights and that rank's experts) and each rank's ZeRO partition file. Those
partitions hold every expert's fp32 weights and AdamW moments. ``load_checkpoint`` restores them
but leaves the module file's values in the model (rank 0's experts on every rank), so the engine
then calls the ZeRO optimizer's ``update_lp_params``, which copies each rank's restored fp32
partition into the model's parameters and all-gathers them over each partition's group. moeforge adds ``experts_ep<k>.pt`` (``save_expert_weights``): each
expert-parallel rank's experts under their global ids, so every weight of the model can be read
without DeepSpeed.

ZeRO stage 0 with ``parallel=ep`` is refused: stage 0 clips with
``deepspeed.runtime.utils.clip_grad_norm_``, which averages the ranks' local gradient norms.
That average is only right when every rank holds the same parameters, which is not the case
under expert parallelism (the clipping error reported in DeepSpeed issues #8469 and #8475).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.checkpoint import write_durably
from moe.experts import EXPERT_WEIGHT_NAMES, Experts
from moe.layer import MoELayer
from parallel import Runtime
from parallel.expert_parallel import apply_expert_parallel
from parallel.modes import parallel_mode


def experts_file(ep_rank: int) -> str:
    """The name of the file holding expert-parallel rank ``ep_rank``'s experts in a checkpoint."""
    return f"experts_ep{ep_rank}.pt"


class DeepSpeedExpertParallel:
    """The model's MoE layers split over DeepSpeed's expert-parallel groups, experts marked for DeepSpeed.

    Built before the optimizer (the experts must be this rank's block by then) and before
    ``deepspeed.initialize`` (which must see the marks).
    """

    def __init__(self, core: nn.Module, runtime: Runtime) -> None:
        from deepspeed import comm
        from deepspeed.utils import groups

        comm.init_distributed(dist_backend=runtime.mesh.backend if runtime.mesh else None, dist_init_required=False, verbose=False)
        self.ep_size = parallel_mode(runtime.cfg.mode).expert_group_size(runtime.cfg, runtime.world_size)
        self.group_name = f"ep_size_{self.ep_size}"
        if self.group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size)
        self.ep_group = groups._get_expert_parallel_group(self.group_name)
        self.ep_rank = groups._get_expert_parallel_rank(self.group_name)
        self.edp_rank = groups._get_expert_data_parallel_rank(self.group_name)
        self.edp_size = groups._get_expert_data_parallel_world_size(self.group_name)
        self.layers = {name: m for name, m in core.named_modules() if isinstance(m, MoELayer)}
        apply_expert_parallel(list(self.layers.values()), self.ep_group, self.ep_rank, self.ep_size, runtime.meter)
        mark_expert_params(list(self.layers.values()), self.group_name)
        self.regroup = moe_param_groups

    @contextlib.contextmanager
    def seen_as_deepspeed_moe(self) -> Iterator[None]:
        """Inside, every ``Experts`` module is also a ``deepspeed.moe.layer.MoE`` (see the module docstring, mark 4)."""
        from deepspeed.moe.layer import MoE

        experts = [layer.experts for layer in self.layers.values()]
        own = [type(m) for m in experts]
        try:
            for m, cls in zip(experts, own):
                m.__class__ = type(f"DeepSpeedMoE{cls.__name__}", (cls, MoE), {
                    "set_deepspeed_parallelism": _groups_already_made,
                    "__module__": __name__,
                })
                m.ep_size, m.expert_group_name = self.ep_size, self.group_name
                m.num_local_experts = m.num_experts // self.ep_size
            yield
        finally:
            for m, cls in zip(experts, own):
                m.__class__ = cls

    def save_expert_weights(self, folder: Path) -> None:
        """Write this expert-parallel rank's experts (first rank of its expert-data-parallel group only).

        ``experts_ep<k>.pt``: ``{"expert_ids": {layer: [global ids]}, "weights": {"<layer>.<w>": tensor}}``,
        read back with ``torch.load(weights_only=True)``.
        """
        if self.edp_rank != 0:
            return
        weights = {f"{name}.experts.{w}": getattr(layer.experts, w).detach().cpu().clone()
                   for name, layer in self.layers.items() for w in EXPERT_WEIGHT_NAMES}
        ids = {name: list(layer.experts.expert_ids or []) for name, layer in self.layers.items()}
        write_durably(folder / experts_file(self.ep_rank), lambda f: torch.save({"expert_ids": ids, "weights": weights}, f))


def mark_expert_params(layers: list[MoELayer], group_name: str) -> None:
    """Mark each expert weight as a DeepSpeed MoE parameter of group ``group_name`` (mark 2).

    ``allreduce = False`` and ``group_name`` are what ``deepspeed.moe.experts.Experts`` sets on its
    own experts and what ``deepspeed.moe.utils.is_moe_param`` reads.
    """
    for layer in layers:
        for name in EXPERT_WEIGHT_NAMES:
            param = getattr(layer.experts, name)
            param.allreduce = False
            param.group_name = group_name


def moe_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``build_optimizer``'s groups with the marked experts moved into DeepSpeed's ``moe: True`` groups (mark 3).

    DeepSpeed's ``split_params_into_different_moe_groups_for_optimizer``: one MoE group per source
    group and expert group name, carrying the source group's keys (weight decay, ``decay``).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def _groups_already_made(self: Experts, use_data_before_expert_parallel_: bool = False) -> None:
    """``MoE.set_deepspeed_parallelism``, which ``DeepSpeedEngine`` calls: the groups exist already."""


def full_expert_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every expert weight of a ``parallel=ep`` DeepSpeed checkpoint, stacked in global expert order.

    Reads the ``experts_ep<k>.pt`` files; keys ``"<layer>.experts.<w>"`` as in the model's state dict.
    """
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for path in sorted(folder.glob("experts_ep*.pt")):
        part = torch.load(path, weights_only=True)
        for key, tensor in part["weights"].items():
            layer = key.rsplit(".experts.", 1)[0]
            for gid, row in zip(part["expert_ids"][layer], tensor):
                rows.setdefault(key, {})[gid] = row
    return {key: torch.stack([by_id[e] for e in sorted(by_id)]) for key, by_id in rows.items()}
