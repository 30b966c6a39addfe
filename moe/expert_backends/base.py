"""The expert-backend seam: one object per way of running the routed SwiGLU experts.

Shape letters: the ``moe`` package legend (T tokens, D model dim, F expert ffn dim, E experts,
R expert-sorted rows).

Every backend answers the same questions, so the local, expert-parallel and FSSDP runners call
them all the same way and no code outside ``moe.expert_backends`` compares backend names:

- ``unavailable(device)``: why it cannot run there (a missing package, the wrong device), or None;
- ``reads_counts_on_host(device)``: whether its grouped call reads the per-expert counts on the
  host there (a synchronisation in every MoE layer);
- ``choice_note(device, num_experts)``: for the start-up line, what a name that chooses (``auto``)
  picked and why;
- ``check_shapes(d_model, d_ff)``: refuse dimensions its kernels cannot take, naming the key;
- ``grouped(x_RD, counts_E, w_gate, w_up, w_down, options)``: the grouped SwiGLU over rows that
  are already sorted by expert (``counts_E`` rows each) -> ``y_RD``; EP and FSSDP call this after
  moving rows to the ranks that hold the experts;
- ``run_plan(x_TD, plan, w_gate, w_up, w_down, options)``: the whole local expert block for a
  ``moe.dispatch.DispatchPlan`` (gather rows, grouped SwiGLU, weighted combine) -> ``y_TD``; the
  default composes ``grouped`` with ``moe.dispatch.gather_rows``/``combine``, and a backend with a
  fused path (gather and combine inside its kernels) overrides it;
- ``resolve(device, d_model, d_ff, num_experts)``: the concrete backend to use there (itself,
  after the checks; ``auto`` answers with the backend measured fastest for that expert count).

``options`` are the knobs a backend may honour (``ExpertOptions``); ``honours`` names the ones it
does, so the config refuses an option the chosen backend would silently ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.layout import BlockSizes
from moe.errors import ConfigError


@dataclass(frozen=True)
class ExpertOptions:
    """Backend knobs from ``ExpertsConfig``: ``regenerate_preactivations`` (the backward computes the
    SwiGLU pre-activations again instead of the forward keeping them) and ``blocks`` (Triton launch
    blocks; None = defaults)."""

    regenerate_preactivations: bool = False
    blocks: BlockSizes | None = None


class ExpertBackend:
    """Base class: subclasses set ``name`` and implement ``grouped``; see the module docstring."""

    name: str = ""
    honours: frozenset[str] = frozenset()
    """``ExpertsConfig`` fields among ``regenerate_preactivations``/``kernel_blocks`` this backend uses."""

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (one line), or None when it can."""
        return None

    def reads_counts_on_host(self, device: torch.device) -> bool:
        """Whether the grouped call reads the per-expert counts on the host on ``device`` (a sync; no CUDA graph)."""
        return True

    def choice_note(self, device: torch.device, num_experts: int) -> str | None:
        """For the start-up line: what this name chose on ``device`` and why (None: it names one backend)."""
        return None

    def check_shapes(self, d_model: int, d_ff: int) -> None:
        """Raise ``ConfigError`` naming ``model.d_model``/``model.d_ff`` if the kernels cannot take them."""

    def grouped(self, x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        """``y_RD[r] = SwiGLU_{e_r}(x_RD[r])`` for rows sorted by expert, ``counts_E`` rows each."""
        raise NotImplementedError

    def run_plan(self, x_TD: Tensor, plan: object, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        """``y_TD[t] = sum over t's rows r of weight_r * SwiGLU_{e_r}(x_TD[t])`` for a ``DispatchPlan``."""
        from moe.dispatch import combine, gather_rows

        y_RD = self.grouped(gather_rows(x_TD, plan), plan.counts_E, w_gate_EDF, w_up_EDF, w_down_EFD, options)
        return combine(y_RD, plan, x_TD.shape[0])

    def resolve(self, device: torch.device, d_model: int, d_ff: int, num_experts: int) -> ExpertBackend:
        """This backend, after checking it can run on ``device`` with these shapes."""
        reason = self.unavailable(device)
        if reason is not None:
            raise ConfigError(f"experts.backend ({self.name!r}) cannot run on {device.type}: {reason}")
        self.check_shapes(d_model, d_ff)
        return self

    def __repr__(self) -> str:
        return self.name
