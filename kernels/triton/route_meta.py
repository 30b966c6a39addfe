"""Routing metadata on the device: counting sort of slots by expert and the M-tile schedule.

Shape legend: T tokens, K slots per token, S slots (T*K), E experts, B slot blocks, N tiles.

``route_meta`` is a stable counting sort in three passes, with no atomics, so the order is
deterministic (the scheme of TransformerEngine's fused-permute ``row_id_map``: block counts ->
global scan -> dense positions):

1. ``_block_counts_kernel``: per block of slots, how many go to each expert ``[B, E]``;
2. ``_block_scan_kernel`` (one program): per-expert totals, then each block's first position
   for each expert = expert offset + counts of that expert in earlier blocks;
3. ``_scatter_positions_kernel``: slot i of block b goes to
   ``base[b, e_i] + #{j < i in b : e_j = e_i}``, so rows of one expert keep token order.

``tile_schedule`` then turns per-expert counts into the fixed-length tile schedule of
``kernels.layout``. Every grid comes from shapes (S, E, block sizes): no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import TileSchedule, max_tiles

_ELEMS_PER_PROGRAM = 4096  # one-hot [BLOCK, E_PAD] working set per program in passes 1 and 3


@triton.jit
def _one_hot(ids, E_PAD: tl.constexpr):
    """int32 [BLOCK, E_PAD]: ``ids[i] == e`` (ids of masked slots are -1, so all-zero rows)."""
    return (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)


@triton.jit
def _block_counts_kernel(ids_ptr, num_slots, counts_ptr, num_experts, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
    counts = tl.sum(_one_hot(ids, E_PAD), axis=0)
    e = tl.arange(0, E_PAD)
    tl.store(counts_ptr + b * num_experts + e, counts, mask=e < num_experts)


@triton.jit
def _block_scan_kernel(counts_ptr, num_blocks, num_experts, base_ptr, totals_ptr, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    totals = tl.zeros((E_PAD,), dtype=tl.int32)
    for b0 in range(0, num_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        mask = (b < num_blocks)[:, None] & e_mask[None, :]
        totals += tl.sum(tl.load(counts_ptr + b[:, None] * num_experts + e[None, :], mask=mask, other=0), axis=0)
    tl.store(totals_ptr + e, totals, mask=e_mask)
    running = tl.cumsum(totals, axis=0) - totals  # exclusive scan over experts
    for b0 in range(0, num_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        mask = (b < num_blocks)[:, None] & e_mask[None, :]
        counts = tl.load(counts_ptr + b[:, None] * num_experts + e[None, :], mask=mask, other=0)
        base = running[None, :] + tl.cumsum(counts, axis=0) - counts
        tl.store(base_ptr + b[:, None] * num_experts + e[None, :], base, mask=mask)
        running += tl.sum(counts, axis=0)


@triton.jit
def _scatter_positions_kernel(ids_ptr, num_slots, base_ptr, num_experts, sorted_ptr, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    valid = offs < num_slots
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    one_hot = _one_hot(ids, E_PAD)
    # Inclusive running count of each slot's own expert inside the block, minus itself.
    rank = tl.sum(one_hot * tl.cumsum(one_hot, axis=0), axis=1) - 1
    base = tl.load(base_ptr + b * num_experts + ids, mask=valid, other=0)
    tl.store(sorted_ptr + base + rank, offs, mask=valid)


@triton.jit
def _tile_schedule_kernel(
    counts_ptr, num_experts, offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    e_mask = e < num_experts
    counts = tl.load(counts_ptr + e, mask=e_mask, other=0).to(tl.int32)
    row_end = tl.cumsum(counts, axis=0)
    if pid == 0:
        tl.store(offsets_ptr + 1 + e, row_end, mask=e_mask)
        tl.store(offsets_ptr + e, tl.zeros((E_PAD,), dtype=tl.int32), mask=e == 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    # Expert of tile t = number of experts whose tiles all end at or before t.
    ends_before = (tile_end[None, :] <= t[:, None]) & e_mask[None, :]
    expert = tl.sum(ends_before.to(tl.int32), axis=1)
    mine = (e[None, :] == expert[:, None]).to(tl.int32)
    first_tile = tl.sum(mine * (tile_end - tiles)[None, :], axis=1)
    first_row = tl.sum(mine * (row_end - counts)[None, :], axis=1)
    used = expert < num_experts
    t_mask = t < num_tiles
    tl.store(tile_expert_ptr + t, tl.where(used, expert, -1), mask=t_mask)
    tl.store(tile_row_start_ptr + t, tl.where(used, first_row + (t - first_tile) * BLOCK_M, 0), mask=t_mask)


def _pad_experts(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def tile_schedule(counts_E: Tensor, num_rows: int, block_m: int) -> TileSchedule:
    """Expert offsets and the fixed-length M-tile schedule for rows split by ``counts_E``.

    ``num_rows`` must be ``counts_E.sum()`` (the caller knows it from a shape, e.g. R).
    """
    E = counts_E.shape[0]
    n_tiles = max_tiles(num_rows, E, block_m)
    dev = counts_E.device
    offsets_E1 = torch.empty(E + 1, dtype=torch.int32, device=dev)
    tile_expert_N = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    tile_row_start_N = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    block_t = 64
    _tile_schedule_kernel[(triton.cdiv(n_tiles, block_t),)](
        counts_E, E, offsets_E1, tile_expert_N, tile_row_start_N, n_tiles,
        BLOCK_M=block_m, BLOCK_T=block_t, E_PAD=_pad_experts(E),
    )
    return TileSchedule(offsets_E1, tile_expert_N, tile_row_start_N, block_m)


def route_meta(expert_ids_TK: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, TileSchedule]:
    """Stable counting sort of the T*K slots by expert, and the tile schedule.

    Returns ``sorted_slot_idx_S`` (int32 [T*K], slots in expert order, token order inside an
    expert) and the ``TileSchedule`` (offsets = exclusive scan of the counts).
    """
    ids_S = expert_ids_TK.reshape(-1).contiguous()
    S, E, dev = ids_S.shape[0], num_experts, ids_S.device
    e_pad = _pad_experts(E)
    block = max(16, min(256, _ELEMS_PER_PROGRAM // e_pad))
    n_blocks = max(1, triton.cdiv(S, block))
    counts_BE = torch.empty(n_blocks, E, dtype=torch.int32, device=dev)
    base_BE = torch.empty_like(counts_BE)
    counts_E = torch.empty(E, dtype=torch.int32, device=dev)
    sorted_S = torch.empty(S, dtype=torch.int32, device=dev)
    _block_counts_kernel[(n_blocks,)](ids_S, S, counts_BE, E, BLOCK=block, E_PAD=e_pad)
    _block_scan_kernel[(1,)](counts_BE, n_blocks, E, base_BE, counts_E, CHUNK=max(1, 4096 // e_pad), E_PAD=e_pad)
    _scatter_positions_kernel[(n_blocks,)](ids_S, S, base_BE, E, sorted_S, BLOCK=block, E_PAD=e_pad)
    return sorted_S, tile_schedule(counts_E, S, block_m)
