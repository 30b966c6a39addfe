"""Expert-backend registry: config name -> backend object (each one file in this folder).

``experts.backend=<name>`` picks an object here; ``Experts.resolve`` turns it into the concrete
backend for the run's device once, and every runner (local, expert-parallel, FSSDP) calls that
object's ``grouped``/``run_plan``. Backend names are looked up only in this package (here, and in
``auto``, which hands back one of the registered backends).
Adding a backend: one file with an ``ExpertBackend`` subclass, one line in ``BACKENDS`` below
(``experts.backend=<name>`` picks it; there is no per-backend YAML).
"""

from __future__ import annotations

import torch

from moe.errors import ConfigError
from moe.expert_backends.auto import AutoBackend
from moe.expert_backends.base import ExpertBackend, ExpertOptions
from moe.expert_backends.torch_loop import swiglu_loop
from moe.registry import load_classes

BACKENDS: dict[str, ExpertBackend] = {name: cls() for name, cls in load_classes({
    "torch": "moe.expert_backends.torch_loop:TorchLoopBackend",
    "grouped_mm": "moe.expert_backends.grouped_mm:GroupedMMBackend",
    "triton": "moe.expert_backends.triton_fused:TritonFusedBackend",
    "megablocks": "moe.expert_backends.megablocks:MegaBlocksBackend",
}, ExpertBackend, "expert backend").items()}
"""Registry name -> backend object, each class given as ``"module:Class"`` (one line per backend)."""
BACKENDS["auto"] = AutoBackend(BACKENDS)


def expert_backend(name: str) -> ExpertBackend:
    """The backend registered as ``name``; a ConfigError naming experts.backend otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"experts.backend ({name!r}) must be one of {sorted(BACKENDS)}") from None


def resolve_backend(name: str, device: torch.device, d_model: int, d_ff: int, num_experts: int) -> ExpertBackend:
    """The concrete backend ``name`` means on ``device`` for these shapes (``auto`` chooses), checked."""
    return expert_backend(name).resolve(device, d_model, d_ff, num_experts)


__all__ = ["BACKENDS", "ExpertBackend", "ExpertOptions", "expert_backend", "resolve_backend", "swiglu_loop"]
