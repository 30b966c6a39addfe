"""SwiGLU experts with stacked weights; the backend that runs them comes from one registry.

Shape letters: the ``moe`` package legend (T tokens, R expert-sorted rows, D model dim, F expert
ffn dim, E experts).

Expert e computes ``y = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]`` (Shazeer 2020, SwiGLU).
Weights are stacked tensors ``w_gate_EDF``, ``w_up_EDF``, ``w_down_EFD`` so a backend sees every
expert at once. ``experts.backend`` names an object in ``moe.expert_backends`` (``torch``: the
per-expert loop, the reference; ``grouped_mm``: library grouped GEMMs with bandwidth-bound glue;
``triton``: moeforge's fused Triton kernels; ``megablocks``; ``auto``: the one measured fastest
on the device). ``Experts.run_plan`` (the whole local block over a dispatch plan) and
``Experts.grouped_swiglu`` (rows already sorted by expert, for EP/FSSDP) are the two seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels.layout import BlockSizes
from moe.autocast import autocast_dtype
from moe.errors import ConfigError, check
from moe.expert_backends import BACKENDS, ExpertBackend, ExpertOptions, expert_backend, resolve_backend


@dataclass(kw_only=True)
class ExpertsConfig:
    backend: str = "auto"
    """torch | grouped_mm | triton | megablocks | auto (auto: the backend measured fastest on this device; torch on CPU)."""
    capacity_factor: float | None = None
    """None = dropless dispatch; a number = GShard capacity ceil(k*T*cf/E), overflow dropped and counted."""
    regenerate_preactivations: bool = False
    """backend=triton (or auto when it picks triton): the forward keeps no SwiGLU pre-activations (gate
    and up projections, 2*R*F values) and the backward computes them again from the rows. Not
    activation checkpointing (train.activation_checkpointing), which reruns whole blocks."""
    recompute: bool | None = None
    """The name ``regenerate_preactivations`` had before; still read (configs and checkpoints written
    before the rename carry it), and folded into it."""
    kernel_blocks: str | None = None
    """backend=triton (or auto when it picks triton): Triton launch blocks "bm/bn/bk/warps/stages[/br[/bwd_bn]]" (e.g. the bench's autotune winner); null = defaults."""

    def __post_init__(self) -> None:
        honours = expert_backend(self.backend).honours  # an unknown name fails here, naming the key
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, "experts.capacity_factor", self.capacity_factor, "must be > 0 (or null for dropless)")
        if self.recompute is not None:
            self.regenerate_preactivations, self.recompute = self.regenerate_preactivations or self.recompute, None
        users = sorted(name for name, b in BACKENDS.items() if "regenerate_preactivations" in b.honours)
        check(not self.regenerate_preactivations or "regenerate_preactivations" in honours, "experts.regenerate_preactivations",
              self.regenerate_preactivations, f"only applies to experts.backend={'|'.join(users)}")
        if self.kernel_blocks is not None:
            users = sorted(name for name, b in BACKENDS.items() if "kernel_blocks" in b.honours)
            check("kernel_blocks" in honours, "experts.kernel_blocks", self.kernel_blocks, f"only applies to experts.backend={'|'.join(users)}")
            self.blocks()  # a bad string fails here, naming the key

    def blocks(self) -> BlockSizes | None:
        """The parsed ``kernel_blocks`` (None: the kernels' defaults)."""
        if self.kernel_blocks is None:
            return None
        try:
            return BlockSizes.parse(str(self.kernel_blocks), "experts.kernel_blocks")
        except ConfigError as exc:
            raise ConfigError(f"experts.kernel_blocks ({self.kernel_blocks!r}): {exc}") from exc

    def options(self) -> ExpertOptions:
        return ExpertOptions(regenerate_preactivations=self.regenerate_preactivations, blocks=self.blocks())


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: CUDA autocast's dtype while it is on (backends call
    library GEMMs and Triton kernels that autocast does not see), else x's own."""
    return autocast_dtype(x) or x.dtype


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

    def __init__(self, num_experts: int, d_model: int, d_ff: int, backend: str = "auto", options: ExpertOptions = ExpertOptions()) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.options = options
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.backend_name = backend
        self.backend: ExpertBackend | None = None  # resolved for the device by ``resolve`` (or at first use)
        expert_backend(backend)
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

    def resolve(self, device: torch.device) -> ExpertBackend:
        """Fix the concrete backend for ``device`` (``auto`` chooses; errors name experts.backend)."""
        self.backend = resolve_backend(self.backend_name, device, self.d_model, self.d_ff, self.num_experts)
        return self.backend

    def _ready(self, x: Tensor) -> ExpertBackend:
        return self.backend if self.backend is not None else self.resolve(x.device)

    def grouped_swiglu(self, x_RD: Tensor, counts_E: Tensor, weights: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """The grouped seam: rows sorted by expert, ``counts_E`` rows each -> ``y_RD``. ``weights``
        replaces this module's (FSSDP passes the experts it gathered for this step)."""
        w = weights if weights is not None else (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)
        return self._ready(x_RD).grouped(x_RD.to(compute_dtype(x_RD)), counts_E, *w, self.options)

    def run_plan(self, x_TD: Tensor, plan: object) -> Tensor:
        """The whole local expert block for a ``moe.dispatch.DispatchPlan`` -> ``y_TD``."""
        return self._ready(x_TD).run_plan(x_TD.to(compute_dtype(x_TD)), plan, self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD, self.options)

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, backend={self.backend or self.backend_name}"


def dense_swiglu(x_TD: Tensor, w_gate_DF: Tensor, w_up_DF: Tensor, w_down_FD: Tensor) -> Tensor:
    """One SwiGLU FFN (dense layers, shared experts)."""
    return (nn.functional.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)) @ w_down_FD
