"""``experts.backend=auto``: the backend measured fastest for this device and shape class.

Shape letters: the ``moe`` package legend (D model dim, F expert ffn dim, E experts, K slots per
token, T tokens).

``MEASURED`` is the table of GPU measurements behind the choice: per card (matched against
``torch.cuda.get_device_name``) and shape class, the whole-layer times of each backend
(``python -m tools.bench.layer``: router + dispatch + experts + combine + statistics, forward and
backward, bf16) and of the plain ``torch._grouped_mm`` layer, with the date. The row's winner is
the fastest backend that was never slower than the plain layer on any of its shapes. A card
without an entry gets ``DEFAULT_CUDA``, the backend that won on every reference shape. On the CPU
``auto`` is ``torch`` (the reference), which keeps CPU runs bit-identical to earlier releases.

Below sm_90 (A100, L40S) ``torch._grouped_mm`` has no grouped kernel: it loops over the groups and
reads their offsets on the host, a host synchronisation in every MoE layer of every step. There
``auto`` picks the Triton backend, whose kernels read the offsets on the device, and says so in
the trainer's start-up line; without Triton it keeps grouped_mm and says that the step syncs.
``choice_for`` is the pure function behind all of this (``tools.bench.step_budget --card`` calls it).

Shape classes: ``coarse`` = few large experts (E <= 16, e.g. Mixtral's 8 x 14336), ``fine`` =
many small experts (E > 16, e.g. OLMoE's 64 x 1024, 128 x 768).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.expert_backends.base import ExpertBackend


@dataclass(frozen=True)
class Measurement:
    """One row of the table: the whole-layer fwd+bwd times on ``card`` at the reference shapes
    of ``shape_class`` (balanced routing), per backend, beside the plain grouped_mm layer."""

    card: str
    shape_class: str
    date: str
    shapes: tuple[tuple[int, int, int, int, int], ...]
    """(D, F, E, K, T) of each time below."""
    ms: dict[str, tuple[float, ...]]
    """backend name (or ``plain``, the plain torch._grouped_mm layer) -> fwd+bwd ms per shape."""

    @property
    def winner(self) -> str:
        """The backend with the least total time that is never slower than the plain layer."""
        plain = self.ms["plain"]
        fair = {n: t for n, t in self.ms.items() if n != "plain" and all(a <= b for a, b in zip(t, plain))}
        return min(fair, key=lambda n: sum(fair[n])) if fair else "torch"


_H200 = "NVIDIA H200"
MEASURED: tuple[Measurement, ...] = (
    # python -m tools.bench.layer on one H200 (torch 2.11, Triton 3.6), main at cedb458 (bash tools/gpu_session.sh).
    Measurement(_H200, "coarse", "2026-11-27", ((4096, 14336, 8, 2, 8192), (1024, 2816, 16, 2, 16384)),
                {"grouped_mm": (27.52, 4.36), "triton": (50.85, 6.06), "plain": (29.80, 4.54)}),
    Measurement(_H200, "fine", "2026-11-27", ((2048, 1024, 64, 8, 16384), (2048, 768, 128, 8, 32768)),
                {"grouped_mm": (8.98, 15.40), "triton": (15.27, 23.54), "plain": (15.96, 28.06)}),
)
DEFAULT_CUDA = "grouped_mm"
"""Backend for a CUDA card without a table entry: the one that won on every reference shape."""


def shape_class(num_experts: int) -> str:
    """``coarse`` (E <= 16) or ``fine`` (E > 16); see the module docstring."""
    return "coarse" if num_experts <= 16 else "fine"


SYNC_FREE_FROM = (9, 0)
"""Compute capability from which ``torch._grouped_mm`` runs one grouped kernel with device offsets."""


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def choice_for(card: str, capability: tuple[int, int] | None, num_experts: int, triton_ok: bool) -> Choice:
    """What ``auto`` picks, and why, on ``card`` (``torch.cuda.get_device_name``; ``capability`` None: the CPU)
    for ``num_experts`` experts, with or without a working Triton (``triton_ok``)."""
    if capability is None:
        return Choice("torch", "the CPU runs the pure-torch reference")
    sm = f"sm_{capability[0]}{capability[1]}"
    if capability < SYNC_FREE_FROM:
        if triton_ok:
            return Choice("triton", f"{card} is {sm}, below sm_90, where torch._grouped_mm loops over the groups and reads "
                                    f"their offsets on the host; the Triton kernels read them on the device (no host sync)")
        fallback = "grouped_mm" if capability >= (8, 0) else "torch"
        return Choice(fallback, f"{card} is {sm}, below sm_90, and Triton is not available: {fallback} reads the expert "
                                f"offsets on the host in every MoE layer (install triton for a step without host syncs)")
    for row in MEASURED:
        if row.card in card and row.shape_class == shape_class(num_experts):
            return Choice(row.winner, f"fastest whole layer on {row.card} for {row.shape_class} experts (measured {row.date})")
    return Choice(DEFAULT_CUDA, f"no measurement for {card} ({sm}); {DEFAULT_CUDA} won on every reference shape elsewhere")


def device_choice(device: torch.device, num_experts: int, triton_ok: bool) -> Choice:
    """``choice_for`` on ``device``."""
    if device.type != "cuda":
        return choice_for("cpu", None, num_experts, triton_ok)
    return choice_for(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), num_experts, triton_ok)


class AutoBackend(ExpertBackend):
    """Resolves to a concrete backend; it never runs experts itself."""

    name = "auto"
    honours = frozenset({"regenerate_preactivations", "kernel_blocks"})  # used when the choice is a backend that honours them

    def __init__(self, registry: dict[str, ExpertBackend]) -> None:
        self.registry = registry

    def resolve(self, device: torch.device, d_model: int, d_ff: int, num_experts: int) -> ExpertBackend:
        chosen = self.registry[device_choice(device, num_experts, self.registry["triton"].unavailable(device) is None).backend]
        if chosen.unavailable(device) is not None:
            chosen = self.registry["torch"]
        return chosen.resolve(device, d_model, d_ff, num_experts)

    def choice_note(self, device: torch.device, num_experts: int) -> str | None:
        choice = device_choice(device, num_experts, self.registry["triton"].unavailable(device) is None)
        missing = self.registry[choice.backend].unavailable(device)
        if missing is not None:
            return f"experts.backend=auto: torch ({choice.backend} would be chosen but {missing})"
        return f"experts.backend=auto: {choice.backend} ({choice.reason})"

    def grouped(self, *args: object) -> object:
        raise TypeError("experts.backend=auto must be resolved to a concrete backend first (Experts.resolve)")
