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

from kernels.errors import check


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
    """Launch parameters of the grouped-GEMM kernels (``tools/bench/layer.py --autotune`` sweeps them).

    block_m/block_n/block_k tile the row, output-column and reduction dims of the forward and
    dgrad GEMMs; block_r is the row chunk of ``grouped_wgrad``'s reduction over an expert's rows
    (its output tiles are block_n square); group_m is how many row tiles share an L2-friendly
    program group (``kernels.triton.tile_matmul.grouped_program``); bwd_block_n narrows the column block
    of the fused down-dgrad + SwiGLU-backward kernel, whose epilogue holds five fp32 tiles.

    Defaults (128/128/64, 8 warps, 3 stages; backward columns 64): the canonical Hopper tile with
    two warpgroups per block, chosen by ``python -m tools.bench.compile_check`` for sm_90 on the four
    reference shapes as the configuration with no register spills in any kernel and at least 8
    resident warps per SM in every GEMM. With block_n 128 the backward kernel spills 1.6 KB per
    thread; the previous default (64/128/64, 4 warps) left the forward kernel at one 4-warp block
    per SM. This is a static choice: no GPU timing has picked it yet (see ``tools/bench/layer.py``).
    ``allow_tf32`` lets fp32 inputs use TF32 tensor cores (opt-in: ScatterMoE issue #5 traced
    logit mismatches to TF32 being on by default).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    block_r: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    bwd_block_n: int | None = 64
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        for key in ("block_m", "block_n", "block_k", "block_r", "bwd_block_n"):
            value = getattr(self, key)
            if value is None:
                continue
            check(value >= 16 and value & (value - 1) == 0, f"kernels.{key}", value, "must be a power of two >= 16 (tl.dot's minimum)")
        check(self.num_warps in (1, 2, 4, 8, 16), "kernels.num_warps", self.num_warps, "must be one of 1, 2, 4, 8, 16")
        check(self.num_stages >= 1, "kernels.num_stages", self.num_stages, "must be >= 1")
        check(self.group_m >= 1, "kernels.group_m", self.group_m, "must be >= 1")

    @classmethod
    def parse(cls, text: str, key: str = "kernels.blocks") -> BlockSizes:
        """``"bm,bn,bk,warps,stages[,br[,bwd_bn]]"`` (``/`` also separates, as Hydra overrides
        need) -> BlockSizes; block_r defaults to block_k, bwd_block_n to the dataclass default.
        Errors name ``key`` (a config key or a CLI flag)."""
        try:
            parts = [int(p) for p in text.replace("/", ",").split(",")]
        except ValueError:
            parts = []
        check(len(parts) in (5, 6, 7), key, text, "must be bm,bn,bk,warps,stages[,br[,bwd_bn]] (integers)")
        bm, bn, bk, warps, stages = parts[:5]
        extra = {"bwd_block_n": parts[6]} if len(parts) == 7 else {}
        return cls(block_m=bm, block_n=bn, block_k=bk, block_r=parts[5] if len(parts) >= 6 else bk, num_warps=warps, num_stages=stages, **extra)

    @property
    def swiglu_bwd_block_n(self) -> int:
        """Column block of the fused down-dgrad + SwiGLU-backward kernel (``bwd_block_n``, else ``block_n``)."""
        return self.bwd_block_n or self.block_n

    def gemm_grid(self, schedule: TileSchedule, n_dim: int, block_n: int | None = None) -> tuple[int]:
        """1-D grid of a grouped GEMM over ``schedule``: one program per (tile, column block)."""
        assert schedule.block_m == self.block_m, "schedule built for another BLOCK_M"
        return (schedule.num_tiles * -(-n_dim // (block_n or self.block_n)),)

    def gemm_launch(self, block_n: int | None = None) -> dict[str, object]:
        """Constexprs and launch options every grouped-GEMM kernel takes."""
        return dict(
            BLOCK_M=self.block_m, BLOCK_N=block_n or self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
            PRECISION=self.precision, num_warps=self.num_warps, num_stages=self.num_stages,
        )

    @property
    def precision(self) -> str:
        """``tl.dot`` input precision for fp32 operands (ignored for bf16/fp16)."""
        return "tf32" if self.allow_tf32 else "ieee"
