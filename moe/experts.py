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
- ``triton``: kernels/ (Triton grouped GEMMs with the gather fused into the A-load and the
  router weight + combine fused into the epilogue; the MoE layer runs the fused path
  ``kernels.moe_experts.fused_moe_experts``); registered lazily, needs Triton and a CUDA device.
- ``megablocks``: MegaBlocks' grouped GEMM, registered lazily when MegaBlocks imports.
- ``auto``: ``triton`` on CUDA when Triton imports, else ``grouped_mm`` on CUDA, else ``torch``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels.layout import BlockSizes
from moe.errors import ConfigError, check

GroupedSwiGLU = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(kw_only=True)
class ExpertsConfig:
    backend: str = "torch"
    """Grouped-GEMM backend: torch | grouped_mm | triton | megablocks | auto."""
    capacity_factor: float | None = None
    """None = dropless dispatch; a number = GShard capacity ceil(k*T*cf/E), overflow dropped and counted."""
    recompute: bool = False
    """backend=triton|auto: recompute the SwiGLU pre-activations in the backward instead of saving them (2*R*F fewer activations)."""
    kernel_blocks: str | None = None
    """backend=triton|auto: Triton launch blocks "bm/bn/bk/warps/stages[/br[/bwd_bn]]" (e.g. the bench's autotune winner); null = defaults."""

    def __post_init__(self) -> None:
        check(self.backend in BACKEND_NAMES, "experts.backend", self.backend, f"must be one of {sorted(BACKEND_NAMES)}")
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, "experts.capacity_factor", self.capacity_factor, "must be > 0 (or null for dropless)")
        triton_only = "only applies to experts.backend=triton|auto"
        check(not self.recompute or self.backend in ("triton", "auto"), "experts.recompute", self.recompute, triton_only)
        if self.kernel_blocks is not None:
            check(self.backend in ("triton", "auto"), "experts.kernel_blocks", self.kernel_blocks, triton_only)
            self.blocks()  # a bad string fails here, naming the key

    def blocks(self) -> BlockSizes | None:
        """The parsed ``kernel_blocks`` (None: the kernels' defaults)."""
        if self.kernel_blocks is None:
            return None
        try:
            return BlockSizes.parse(str(self.kernel_blocks), "experts.kernel_blocks")
        except ConfigError as exc:
            raise ConfigError(f"experts.kernel_blocks ({self.kernel_blocks!r}): {exc}") from exc


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
    """Map ``auto`` to a concrete backend for ``device``, register lazy backends, check it can run."""
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        name = "triton" if _register_triton() else "grouped_mm"
    if name == "triton":
        if not _register_triton():
            raise ConfigError("experts.backend ('triton') needs the triton package (pip install triton)")
        from kernels.moe_experts import INTERPRETED

        if device.type != "cuda" and not INTERPRETED:
            raise ConfigError(f"experts.backend ('triton') needs a CUDA device (this run is on {device.type}); use torch or grouped_mm")
    if name == "megablocks":
        from kernels.megablocks_backend import UNAVAILABLE_REASON, swiglu_megablocks

        if UNAVAILABLE_REASON is not None:
            raise ConfigError(f"experts.backend ('megablocks') is unavailable: {UNAVAILABLE_REASON}")
        BACKENDS["megablocks"] = swiglu_megablocks
    return name


def _register_triton() -> bool:
    """Add the Triton backend to ``BACKENDS`` if Triton imports; True when it is there."""
    if "triton" not in BACKENDS:
        try:
            from kernels.moe_experts import swiglu_triton
        except ImportError:
            return False
        BACKENDS["triton"] = swiglu_triton
    return True


EXPERT_WEIGHT_NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
"""The stacked weights of ``Experts``, in the order every backend takes them."""


class Experts(nn.Module):
    """E SwiGLU experts of width F over model dim D, weights stacked per expert.

    In one process the module holds all E experts. The parallel runtime may leave it only some
    rows: ``parallel=ep``/``fssdp`` keep this rank's experts and name them in ``expert_ids``
    (global ids, in row order) and set ``expert_group``, the process group in which every
    expert is held exactly once; ``parallel=fsdp`` turns the weights into DTensors sharded on
    the expert dim. ``local_rows`` and ``read_expert`` work the same in every case.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, backend: str = "torch", *, recompute: bool = False, blocks: BlockSizes | None = None) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.recompute, self.blocks = recompute, blocks  # Triton options (ExpertsConfig.recompute, kernel_blocks)
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.backend = backend
        self.expert_ids: list[int] | None = None
        self.expert_group: torch.distributed.ProcessGroup | None = None
        self.reset_parameters()

    def rows_of(self, t: Tensor) -> tuple[list[int], Tensor]:
        """(global expert id of each local row, the local rows, writable in place) of a tensor laid
        out like a stacked weight: the weight itself or its optimizer state."""
        from moe.dtensor_io import local_rows

        start, rows = local_rows(t)
        ids = self.expert_ids if self.expert_ids is not None else list(range(start, start + rows.shape[0]))
        assert len(ids) == rows.shape[0], (len(ids), rows.shape)
        return list(ids), rows

    def local_rows(self, name: str) -> tuple[list[int], Tensor]:
        """``rows_of`` the weight ``name``."""
        return self.rows_of(getattr(self, name))

    @torch.no_grad()
    def read_expert(self, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of global expert ``e``'s (gate, up, down) weights, identical on every rank.

        Where the experts are split over ranks, each rank contributes the row it holds (zeros
        elsewhere) to an all-reduce over the group in which every expert lives exactly once;
        adding zeros is exact, so every rank gets the owner's bits. All ranks of that group
        must call it together.
        """
        from moe.dtensor_io import shard_group

        out = []
        for name in EXPERT_WEIGHT_NAMES:
            ids, rows = self.local_rows(name)
            row = rows[ids.index(e)].clone() if e in ids else rows.new_zeros(rows.shape[1:])
            group = shard_group(getattr(self, name)) or self.expert_group
            if group is not None:
                torch.distributed.all_reduce(row, group=group)
            out.append(row)
        return out[0], out[1], out[2]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_EDF, std=self.d_model**-0.5)
        nn.init.normal_(self.w_up_EDF, std=self.d_model**-0.5)
        nn.init.normal_(self.w_down_EFD, std=self.d_ff**-0.5)

    def grouped_swiglu(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """The kernel seam: rows sorted by expert, ``counts_E`` rows each -> outputs ``y_RD``."""
        fn = BACKENDS[self.backend]
        options = {"recompute": self.recompute, "blocks": self.blocks} if self.backend == "triton" else {}
        return fn(x_RD, counts_E, self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD, **options)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, backend={self.backend}"


def dense_swiglu(x_TD: Tensor, w_gate_DF: Tensor, w_up_DF: Tensor, w_down_FD: Tensor) -> Tensor:
    """One SwiGLU FFN (dense layers, shared experts)."""
    return (nn.functional.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)) @ w_down_FD
