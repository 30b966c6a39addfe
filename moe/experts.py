"""SwiGLU experts with stacked weights and pluggable grouped-GEMM backends.

Shape legend: R expert-sorted rows, D model dim, F expert ffn dim, E experts.

Expert e computes ``y = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]`` (Shazeer 2020, SwiGLU).
Weights are stacked tensors ``w_gate_EDF``, ``w_up_EDF``, ``w_down_EFD`` so a backend sees
every expert at once. ``Experts.grouped_swiglu`` is the one seam a kernel backend plugs into:
it takes the expert-sorted rows and per-expert counts and returns the rows' outputs.

Backends (``experts.backend``):
- ``torch``: a plain loop over experts; the reference, works for every dtype and device.
- ``grouped_mm``: ``torch._grouped_mm`` (torch >= 2.9, CPU and CUDA); fp32/bf16/fp16, and
  D and F must keep rows 16-byte aligned (multiples of 8 covers every dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import ConfigError, check

GroupedSwiGLU = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(kw_only=True)
class ExpertsConfig:
    backend: str = "torch"
    """Grouped-GEMM backend: torch | grouped_mm | triton | megablocks | auto."""
    capacity_factor: float | None = None
    """None = dropless dispatch; a number = GShard capacity ceil(k*T*cf/E), overflow dropped and counted."""

    def __post_init__(self) -> None:
        check(self.backend in BACKEND_NAMES, "experts.backend", self.backend, f"must be one of {sorted(BACKEND_NAMES)}")
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, "experts.capacity_factor", self.capacity_factor, "must be > 0 (or null for dropless)")


def swiglu_loop(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
    """Reference backend: one dense SwiGLU per expert over its contiguous rows."""
    outs = []
    for e, rows_D in enumerate(torch.split(x_RD, counts_E.tolist())):
        h_F = nn.functional.silu(rows_D @ w_gate_EDF[e]) * (rows_D @ w_up_EDF[e])
        outs.append(h_F @ w_down_EFD[e])
    if not outs:
        return x_RD.new_zeros(0, w_down_EFD.shape[-1])
    return torch.cat(outs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm`` needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g.contiguous()


def swiglu_grouped_mm(x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
    """``torch._grouped_mm`` backend: three grouped GEMMs over the expert segments."""
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_RD = x_RD.contiguous()
    gate_RF = _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_gate_EDF, offs=offs_E))
    up_RF = _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_up_EDF, offs=offs_E))
    h_RF = (nn.functional.silu(gate_RF) * up_RF).contiguous()
    return _ContiguousGrad.apply(torch._grouped_mm(h_RF, w_down_EFD, offs=offs_E))


BACKENDS: dict[str, GroupedSwiGLU] = {"torch": swiglu_loop, "grouped_mm": swiglu_grouped_mm}
# Names the config accepts; backends outside BACKENDS are resolved lazily by resolve_backend.
BACKEND_NAMES = {"torch", "grouped_mm", "triton", "megablocks", "auto"}


def resolve_backend(name: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for ``device`` and check the choice can run."""
    if name == "auto":
        if device.type == "cuda":
            try:
                import kernels.moe_experts  # noqa: F401

                return "triton"
            except ImportError:
                return "grouped_mm"
        return "torch"
    if name not in BACKENDS:
        raise ConfigError(f"experts.backend ({name!r}) is not available in this build; available: {sorted(BACKENDS)}")
    return name


class Experts(nn.Module):
    """E SwiGLU experts of width F over model dim D, weights stacked per expert."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, backend: str = "torch") -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_EDF, std=self.d_model**-0.5)
        nn.init.normal_(self.w_up_EDF, std=self.d_model**-0.5)
        nn.init.normal_(self.w_down_EFD, std=self.d_ff**-0.5)

    def grouped_swiglu(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """The kernel seam: rows sorted by expert, ``counts_E`` rows each -> outputs ``y_RD``."""
        fn = BACKENDS[self.backend]
        return fn(x_RD, counts_E, self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, backend={self.backend}"


def dense_swiglu(x_TD: Tensor, w_gate_DF: Tensor, w_up_DF: Tensor, w_down_FD: Tensor) -> Tensor:
    """One SwiGLU FFN (dense layers, shared experts)."""
    return (nn.functional.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)) @ w_down_FD


def align_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n."""
    return int(math.ceil(n / multiple) * multiple)
