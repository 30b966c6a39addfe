"""The trainer's entry into the parallel package (single-process implementation).

``parallel=none`` runs in one process. Other modes are added by the files beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe.errors import check

MODES = ("none",)


@dataclass(kw_only=True)
class ParallelConfig:
    mode: str = "none"
    """none | ddp | fsdp | ep | fssdp."""

    def __post_init__(self) -> None:
        check(self.mode in MODES, "parallel.mode", self.mode, f"must be one of {list(MODES)}")


@dataclass
class Runtime:
    """Where this process sits in the job and the collectives the trainer uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor across ranks in place (no-op in one process)."""

    def all_reduce_max_(self, tensors: list[Tensor]) -> None:
        """Max of each tensor across ranks in place (no-op in one process)."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip gradients to ``max_norm`` by their global L2 norm; returns the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Finish gradient communication the backward did not (no-op in one process)."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Per-step bookkeeping after ``optimizer.step()`` (e.g. FSSDP re-planning); no-op here."""

    def comm_metrics(self) -> dict[str, float]:
        """Bytes sent/received per collective since the last call, as ``comm/<name>_bytes`` keys."""
        return {}

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""

    def shutdown(self) -> None:
        """Tear down the process group, if any."""


def setup_runtime(cfg: ParallelConfig) -> Runtime:
    """Single-process runtime on CUDA when available, else CPU."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return Runtime(device=device)


def apply_parallel(model: nn.Module, cfg: ParallelConfig, runtime: Runtime) -> nn.Module:
    """``parallel=none``: the model as built."""
    return model


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict[str, object]:
    """Model and optimizer state in DCP form (fully-qualified parameter names as keys).

    Parallel modes override how sharded/owned tensors appear here so that a checkpoint saved on
    one layout loads on another.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def load_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, object], runtime: Runtime) -> None:
    """Inverse of ``checkpoint_state``: copy loaded tensors into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
