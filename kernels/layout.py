"""The expert-sorted row layout every kernel shares, and the kernels' launch block sizes.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots per token,
S slots (T*K), R routed rows (kept slots, R <= S), N tiles of the schedule.

Data contract (the same as ``moe.dispatch.DispatchPlan``):

- slots are numbered token-major, ``slot = t*K + j``;
- ``slot_idx_R`` lists the kept slots stably sorted by expert, so the rows of one expert are
  contiguous and stay in token order (``sorted_slot_idx`` when every slot is kept, R == S);
- ``expert_offsets_E1`` (int32, length E+1) is the exclusive scan of the per-expert counts: rows
  of expert e are ``expert_offsets_E1[e] : expert_offsets_E1[e+1]``;
- the tile schedule gives each M-tile of ``block_m`` rows exactly one expert
  (``tile_expert_N[n]``, ``-1`` for an unused tile) and its first row
  (``tile_row_start_N[n]``). Padding lives only in these indices: no row is ever copied into a
  padded buffer (ScatterMoE's ``padded_block_indices``, Tan et al. 2024, arXiv 2403.08245 §3).

The schedule has a fixed length ``max_tiles(R, E, block_m)`` known from shapes alone, so every
grid is sized on the host without reading a device value (no host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from moe.errors import check


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on ``sum_e ceil(count_e / block_m)`` over any split of ``num_rows`` rows.

    ``ceil(c/b) <= c/b + 1 - 1/b`` per expert, so the sum is below ``R/b + E``; the bound needs
    only shapes, which is what keeps grid sizing free of host synchronisation.
    """
    return -(-num_rows // block_m) + num_experts


@dataclass(frozen=True)
class TileSchedule:
    """Device-built M-tile schedule over the expert-sorted rows (see the module docstring).

    expert_offsets_E1: int32 [E+1] exclusive scan of the per-expert row counts.
    tile_expert_N:     int32 [N] expert of each tile, -1 where the tile is unused.
    tile_row_start_N:  int32 [N] first expert-sorted row of each tile.
    block_m:           rows per tile; kernels must launch with this BLOCK_M.
    """

    expert_offsets_E1: Tensor
    tile_expert_N: Tensor
    tile_row_start_N: Tensor
    block_m: int

    @property
    def num_experts(self) -> int:
        return self.expert_offsets_E1.shape[0] - 1

    @property
    def num_tiles(self) -> int:
        return self.tile_expert_N.shape[0]


@dataclass(frozen=True)
class BlockSizes:
    """Launch parameters of the grouped-GEMM kernels (``tools/bench_layer.py --autotune`` sweeps them).

    block_m/block_n/block_k tile the row, output-column and reduction dims of the forward and
    dgrad GEMMs; block_r is the row chunk of ``grouped_wgrad``'s reduction over an expert's rows.
    ``allow_tf32`` lets fp32 inputs use TF32 tensor cores (opt-in: ScatterMoE issue #5 traced
    logit mismatches to TF32 being on by default).
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    block_r: int = 32
    num_warps: int = 4
    num_stages: int = 3
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        for key in ("block_m", "block_n", "block_k", "block_r"):
            value = getattr(self, key)
            check(value >= 16 and value & (value - 1) == 0, f"kernels.{key}", value, "must be a power of two >= 16 (tl.dot's minimum)")
        check(self.num_warps in (1, 2, 4, 8, 16), "kernels.num_warps", self.num_warps, "must be one of 1, 2, 4, 8, 16")
        check(self.num_stages >= 1, "kernels.num_stages", self.num_stages, "must be >= 1")

    @property
    def precision(self) -> str:
        """``tl.dot`` input precision for fp32 operands (ignored for bf16/fp16)."""
        return "tf32" if self.allow_tf32 else "ieee"
