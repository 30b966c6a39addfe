"""``experts.backend=auto``: the backend measured fastest for this device and shape class.

Shape legend: D model dim, F expert ffn dim, E experts, K top-k, T tokens.

``MEASURED`` is the table of GPU measurements behind the choice: per card (matched against
``torch.cuda.get_device_name``) and shape class, which backend won the whole-layer benchmark
(``python -m tools.bench_layer``: router + dispatch + experts + combine + statistics, forward and
backward, bf16), with the date, the card and the numbers. A card without an entry gets
``DEFAULT_CUDA``, the backend that won on the reference shapes. ``auto`` never picks a backend
that was measured slower than the plain ``torch._grouped_mm`` layer on that row. On the CPU it is
``torch`` (the reference), which keeps CPU runs bit-identical to earlier releases.

Shape classes: ``coarse`` = few large experts (E <= 16, e.g. Mixtral's 8 x 14336), ``fine`` =
many small experts (E > 16, e.g. OLMoE's 64 x 1024, 128 x 768).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.expert_backends.base import ExpertBackend


@dataclass(frozen=True)
class Measurement:
    """One row of the table: on ``card`` for ``shape_class``, ``winner`` was fastest."""

    card: str
    shape_class: str
    winner: str
    date: str
    evidence: str
    """The measured times it rests on (ms, fwd+bwd, per reference shape), for the reader."""


MEASURED: tuple[Measurement, ...] = ()
DEFAULT_CUDA = "grouped_mm"
"""Backend for a CUDA card without a table entry (the reference shapes' winner)."""


def shape_class(num_experts: int) -> str:
    """``coarse`` (E <= 16) or ``fine`` (E > 16); see the module docstring."""
    return "coarse" if num_experts <= 16 else "fine"


def measured_choice(device: torch.device, num_experts: int) -> str:
    """The backend name ``auto`` picks on ``device`` for ``num_experts`` experts."""
    if device.type != "cuda":
        return "torch"
    card = torch.cuda.get_device_name(device)
    for row in MEASURED:
        if row.card in card and row.shape_class == shape_class(num_experts):
            return row.winner
    return DEFAULT_CUDA


class AutoBackend(ExpertBackend):
    """Resolves to a concrete backend; it never runs experts itself."""

    name = "auto"
    honours = frozenset({"recompute", "kernel_blocks"})  # used when the choice is a backend that honours them

    def __init__(self, registry: dict[str, ExpertBackend]) -> None:
        self.registry = registry

    def resolve_for(self, device: torch.device, d_model: int, d_ff: int, num_experts: int) -> ExpertBackend:
        chosen = self.registry[measured_choice(device, num_experts)]
        if chosen.unavailable(device) is not None:
            chosen = self.registry["torch"]
        return chosen.resolve(device, d_model, d_ff)

    def resolve(self, device: torch.device, d_model: int, d_ff: int) -> ExpertBackend:
        raise TypeError("auto needs the expert count: call resolve_for")

    def grouped(self, *args: object) -> object:
        raise TypeError("experts.backend=auto must be resolved to a concrete backend first (Experts.resolve)")
