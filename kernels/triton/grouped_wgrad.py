"""Per-expert weight gradient over each expert's contiguous expert-sorted rows.

Shape legend: E experts, R routed rows (expert-sorted), M/N the gradient's two dims,
BM/BN output blocks, BR the row chunk of the reduction.

``dW_EMN[e] = sum over rows r of expert e of a[r]^T (scale_r * b[r])`` (ScatterMoE's
``_groupXtY``, arXiv 2403.08245 §3.2). Row r of ``a`` (and of ``b``) is read either from a
token- or slot-major source at ``slot_r // div`` (gathered inside the load) or from the
expert-sorted buffer itself. One program per (expert, M block, N block) loops over the rows
``expert_offsets[e] : expert_offsets[e+1]`` in fp32; an expert with no rows runs zero
iterations and writes zeros. The loop bounds are read on the device, so the grid needs only
E and the weight shape (no host synchronisation).

Program order: expert slowest, and inside an expert the (M, N) blocks in ``GROUP_M`` groups
(``kernels.triton.tile_matmul.grouped_program``), so resident programs share the same expert's row
blocks of ``a`` and ``b`` in L2. With the expert fastest (the first version), a wave of programs
shared one column block of ``b`` but each read its own 0.5 MB slice of ``a``: at
(4096, 14336, 8, 2, 8192), 28,672 programs x 0.5 MB, about 14 GB of HBM traffic for 1.9 TFLOP
of dW_gate; grouped, a wave touches 8 row blocks x ~16 column blocks of one expert (about
12 MB) and ``a`` is read about once (a wave-footprint estimate, not a measurement).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import BlockSizes
from kernels.triton.tile_matmul import grouped_program, mma, source_rows


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, stride_ar, stride_am, a_div, b_ptr, stride_br, stride_bn, b_div,
    slot_ptr, scale_ptr, offsets_ptr, c_ptr, stride_ce, stride_cm, stride_cn, m_dim, n_dim,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    m_blocks, n_blocks = tl.cdiv(m_dim, BLOCK_M), tl.cdiv(n_dim, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (m_blocks * n_blocks)
    pid_m, pid_n = grouped_program(pid % (m_blocks * n_blocks), m_blocks, n_blocks, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < m_dim, offs_n < n_dim
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < end
        a_rows = source_rows(slot_ptr, rows, r_mask, a_div, A_GATHER)
        b_rows = source_rows(slot_ptr, rows, r_mask, b_div, B_GATHER)
        a = tl.load(a_ptr + a_rows[:, None] * stride_ar + offs_m[None, :] * stride_am, mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + offs_n[None, :] * stride_bn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * scale[:, None]).to(a.dtype)
        acc = mma(tl.trans(a), b, acc, PRECISION)
    out = c_ptr + expert.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def grouped_wgrad(
    a_XM: Tensor, a_div: int | None, b_YN: Tensor, b_div: int | None, slot_idx_R: Tensor, expert_offsets_E1: Tensor,
    scale_R: Tensor | None = None, *, blocks: BlockSizes = BlockSizes(), out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``dW_EMN[e] = sum_{r in e} a[r]^T (scale_r b[r])``, fp32 accumulation, zeros for empty experts.

    ``a_div``/``b_div``: row r reads ``a_XM[slot_idx_R[r] // a_div]``, or ``a_XM[r]`` when None.
    ``out_dtype`` defaults to ``a_XM.dtype``; pass ``torch.float32`` for an fp32 main-grad.
    """
    E, M, N = expert_offsets_E1.shape[0] - 1, a_XM.shape[1], b_YN.shape[1]
    assert a_XM.dtype == b_YN.dtype, "tl.dot needs both operands in one dtype"
    dw_EMN = torch.empty(E, M, N, dtype=out_dtype or a_XM.dtype, device=a_XM.device)
    tile = blocks.block_n  # square output tiles; the reduction runs over block_r rows
    _grouped_wgrad_kernel[(E * triton.cdiv(M, tile) * triton.cdiv(N, tile),)](
        a_XM, a_XM.stride(0), a_XM.stride(1), a_div or 1, b_YN, b_YN.stride(0), b_YN.stride(1), b_div or 1,
        slot_idx_R, a_XM if scale_R is None else scale_R, expert_offsets_E1, dw_EMN, *dw_EMN.stride(), M, N,
        A_GATHER=a_div is not None, B_GATHER=b_div is not None, HAS_SCALE=scale_R is not None,
        BLOCK_M=tile, BLOCK_N=tile, BLOCK_R=blocks.block_r, GROUP_M=blocks.group_m, PRECISION=blocks.precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return dw_EMN
