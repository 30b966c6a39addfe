"""Attention's fused projection to the heads SDPA reads: q/k RMSNorm, RoPE and head split, one kernel each way.

Shape legend: B batch, S positions, T = B*S tokens, H query heads, G key/value heads, d head dim
(even), N = (H + 2G) d the projection's width, P the backward's programs per part.

One program handles one part (query or key) of one token row of ``qkv [B, S, N]``. For the
query part ``x`` (H*d wide; the key part alike with G heads and ``w_k``), in fp32::

    full:      r = 1 / sqrt(mean(x^2) + eps)            over the whole H*d row (OLMoE)
    per_head:  r_h = 1 / sqrt(mean(x_h^2) + eps)        over each head's d (Qwen3)
    none:      r = 1, no weight
    n = x r                y = n w                      (RMSNorm, Zhang & Sennrich 2019, eq. 4)
    o1 = y1 cos_s - y2 sin_s      o2 = y1 sin_s + y2 cos_s   (RoPE, Su et al. 2021, eq. 34,
                                                              halves y1, y2 of each head)

``q [B, S, H, d]`` and ``k [B, S, G, d]`` are written contiguous, so their ``transpose(1, 2)``
are the [B, heads, S, d] views SDPA takes, in FlashAttention's own [B, S, heads, d] layout (no
copy in, and the output it returns is [B, S, H, d] in memory, which the out projection reads
without a copy). The values need no pass: SDPA reads them as a strided view of ``qkv``. ``r`` is
kept in fp32 for the backward.

Backward, from ``do`` (any strides, unit-stride rows), the saved ``qkv`` and ``r``::

    dy1 = do1 cos_s + do2 sin_s      dy2 = do2 cos_s - do1 sin_s   (rotation by -angle)
    dw  += dy n                                                    (summed over this program's rows;
                                                                    per_head: over heads too)
    dn = dy w
    dx = r (dn - n mean(dn n))       (the mean over the group r was taken over)

written straight into ``dqkv [B, S, N]`` (no ``cat``); the value part's programs copy ``dv``
into it. Each backward program of the query and key parts walks the rows ``p, p + P, p + 2P,
...`` and writes its fp32 ``dw`` partial sum to row ``p`` of a [P, width] buffer; the caller
sums the P rows (deterministic, no atomics). The pure-torch twin is ``kernels.reference.qkv_heads`` /
``qkv_heads_bwd``; the ops live in ``kernels.ops``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

NORM_CODES = {"none": 0, "full": 1, "per_head": 2}
"""The kernels' ``NORM`` constexpr for each ``model.qk_norm`` mode."""


@triton.jit
def _load_halves(ptr, heads, cols, mask, HALF: tl.constexpr):
    """The two halves [heads, d/2] of a row of heads at ``ptr`` (unit-stride head rows of stride 2*HALF)."""
    off = heads[:, None] * (2 * HALF) + cols[None, :]
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32), tl.load(ptr + off + HALF, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rstd(x1, x2, eps, NH: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):
    """1/rms: a scalar (full) or one per head (per_head); 1 for none."""
    sq = x1 * x1 + x2 * x2
    if NORM == 1:
        return 1.0 / tl.sqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / (NH * 2 * HALF) + eps)
    else:
        return 1.0 / tl.sqrt(tl.sum(sq, axis=1) / (2 * HALF) + eps)


@triton.jit
def _weight_halves(w_ptr, heads, cols, mask, HALF: tl.constexpr, NORM: tl.constexpr):
    """The norm weight as [heads, d/2] halves: per element of the row (full) or per column of a head (per_head)."""
    if NORM == 1:
        return _load_halves(w_ptr, heads, cols, mask, HALF)
    else:
        w1 = tl.load(w_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        return tl.broadcast_to(w1[None, :], mask.shape), tl.broadcast_to(w2[None, :], mask.shape)


@triton.jit
def _norm_rope_fwd(src, dst, w_ptr, rstd_ptr, c, sn, eps, NH: tl.constexpr, NHP: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr,
                   NORM: tl.constexpr):
    heads = tl.arange(0, NHP)
    cols = tl.arange(0, HALFP)
    mask = (heads < NH)[:, None] & (cols < HALF)[None, :]
    x1, x2 = _load_halves(src, heads, cols, mask, HALF)
    if NORM != 0:
        r = _rstd(x1, x2, eps, NH, HALF, NORM)
        w1, w2 = _weight_halves(w_ptr, heads, cols, mask, HALF, NORM)
        if NORM == 1:
            tl.store(rstd_ptr, r)
            x1, x2 = x1 * r * w1, x2 * r * w2
        else:
            tl.store(rstd_ptr + heads, r, mask=heads < NH)
            x1, x2 = x1 * r[:, None] * w1, x2 * r[:, None] * w2
    off = heads[:, None] * (2 * HALF) + cols[None, :]
    tl.store(dst + off, (x1 * c[None, :] - x2 * sn[None, :]).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + off + HALF, (x1 * sn[None, :] + x2 * c[None, :]).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_heads_fwd_kernel(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, rstd_ptr, S, stride_b, stride_s, stride_cs, eps,
                          H: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr,
                          NQ: tl.constexpr, NK: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = t % S
    row = qkv_ptr + (t // S) * stride_b + s * stride_s
    cols = tl.arange(0, HALFP)
    c = tl.load(cos_ptr + s * stride_cs + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + s * stride_cs + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _norm_rope_fwd(row, q_ptr + t * (H * 2 * HALF), wq_ptr, rstd_ptr + t * (NQ + NK), c, sn, eps, H, HP, HALF, HALFP, NORM)
    else:
        _norm_rope_fwd(row + H * 2 * HALF, k_ptr + t * (G * 2 * HALF), wk_ptr, rstd_ptr + t * (NQ + NK) + NQ, c, sn, eps, G, GP, HALF, HALFP, NORM)


@triton.jit
def _norm_rope_bwd(do_ptr, do_b, do_s, do_h, x_ptr, x_b, x_s, dx_ptr, dx_t, w_ptr, rstd_ptr, rstd_t, dw_ptr, cos_ptr, sin_ptr, stride_cs,
                   p, P, T, S, NH: tl.constexpr, NHP: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr, NORM: tl.constexpr):
    heads = tl.arange(0, NHP)
    cols = tl.arange(0, HALFP)
    mask = (heads < NH)[:, None] & (cols < HALF)[None, :]
    if NORM != 0:
        w1, w2 = _weight_halves(w_ptr, heads, cols, mask, HALF, NORM)
    acc1 = tl.zeros((NHP, HALFP), dtype=tl.float32)
    acc2 = tl.zeros((NHP, HALFP), dtype=tl.float32)
    for i in range(0, tl.cdiv(T - p, P)):
        t = (p + i * P).to(tl.int64)
        b = t // S
        s = t % S
        c = tl.load(cos_ptr + s * stride_cs + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        sn = tl.load(sin_ptr + s * stride_cs + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        src = do_ptr + b * do_b + s * do_s + heads[:, None] * do_h + cols[None, :]
        do1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        do2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dy1 = do1 * c + do2 * sn
        dy2 = do2 * c - do1 * sn
        if NORM != 0:
            x1, x2 = _load_halves(x_ptr + b * x_b + s * x_s, heads, cols, mask, HALF)
            if NORM == 1:
                r = tl.load(rstd_ptr + t * rstd_t)
            else:
                r = tl.load(rstd_ptr + t * rstd_t + heads, mask=heads < NH, other=0.0)[:, None]
            n1, n2 = x1 * r, x2 * r
            acc1 += dy1 * n1
            acc2 += dy2 * n2
            dn1, dn2 = dy1 * w1, dy2 * w2
            if NORM == 1:
                m = tl.sum(tl.sum(dn1 * n1 + dn2 * n2, axis=1), axis=0) / (NH * 2 * HALF)
            else:
                m = (tl.sum(dn1 * n1 + dn2 * n2, axis=1) / (2 * HALF))[:, None]
            dy1, dy2 = r * (dn1 - n1 * m), r * (dn2 - n2 * m)
        dst = dx_ptr + t * dx_t + heads[:, None] * (2 * HALF) + cols[None, :]
        tl.store(dst, dy1.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, dy2.to(dx_ptr.dtype.element_ty), mask=mask)
    if NORM == 1:
        off = p.to(tl.int64) * (NH * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
        tl.store(dw_ptr + off, acc1, mask=mask)
        tl.store(dw_ptr + off + HALF, acc2, mask=mask)
    if NORM == 2:
        ok = cols < HALF
        tl.store(dw_ptr + p.to(tl.int64) * (2 * HALF) + cols, tl.sum(acc1, axis=0), mask=ok)
        tl.store(dw_ptr + p.to(tl.int64) * (2 * HALF) + HALF + cols, tl.sum(acc2, axis=0), mask=ok)


@triton.jit
def _copy_v_bwd(dv_ptr, dv_b, dv_s, dv_h, dx_ptr, dx_t, p, P, T, S, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    heads = tl.arange(0, GP)
    cols = tl.arange(0, DP)
    mask = (heads < G)[:, None] & (cols < D)[None, :]
    for i in range(0, tl.cdiv(T - p, P)):
        t = (p + i * P).to(tl.int64)
        dv = tl.load(dv_ptr + (t // S) * dv_b + (t % S) * dv_s + heads[:, None] * dv_h + cols[None, :], mask=mask)
        tl.store(dx_ptr + t * dx_t + heads[:, None] * D + cols[None, :], dv.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_heads_bwd_kernel(dq_ptr, dq_b, dq_s, dq_h, dk_ptr, dk_b, dk_s, dk_h, dv_ptr, dv_b, dv_s, dv_h, qkv_ptr, x_b, x_s, rstd_ptr, wq_ptr, wk_ptr,
                          cos_ptr, sin_ptr, stride_cs, dqkv_ptr, dwq_ptr, dwk_ptr, T, S, P,
                          H: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr,
                          NQ: tl.constexpr, NK: tl.constexpr, NORM: tl.constexpr, DP: tl.constexpr):
    p = tl.program_id(0)
    part = tl.program_id(1)
    N: tl.constexpr = (H + 2 * G) * 2 * HALF
    if part == 0:
        _norm_rope_bwd(dq_ptr, dq_b, dq_s, dq_h, qkv_ptr, x_b, x_s, dqkv_ptr, N, wq_ptr, rstd_ptr, NQ + NK, dwq_ptr, cos_ptr, sin_ptr, stride_cs,
                       p, P, T, S, H, HP, HALF, HALFP, NORM)
    elif part == 1:
        _norm_rope_bwd(dk_ptr, dk_b, dk_s, dk_h, qkv_ptr + H * 2 * HALF, x_b, x_s, dqkv_ptr + H * 2 * HALF, N, wk_ptr, rstd_ptr + NQ, NQ + NK,
                       dwk_ptr, cos_ptr, sin_ptr, stride_cs, p, P, T, S, G, GP, HALF, HALFP, NORM)
    else:
        _copy_v_bwd(dv_ptr, dv_b, dv_s, dv_h, dqkv_ptr + (H + G) * 2 * HALF, N, p, P, T, S, G, GP, 2 * HALF, DP)


def _warps(heads: int, half: int) -> int:
    """4 warps up to 2,048 elements per part (olmoe's 16 heads of 128), 8 beyond."""
    return 4 if triton.next_power_of_2(heads) * triton.next_power_of_2(half) * 2 <= 2048 else 8


def qkv_heads_fwd_into(qkv_BSN: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos_Sh: Tensor, sin_Sh: Tensor, mode: str, eps: float,
                       q_BSHd: Tensor, k_BSGd: Tensor, rstd_TR: Tensor) -> None:
    """Launch the forward: ``qkv`` (unit-stride columns) -> contiguous ``q``, ``k`` and fp32 ``rstd``
    [T, nq + nk] (nq = 1 full, H per_head, 0 none; the same for k). cos/sin [S, d/2], unit-stride rows."""
    B, S, _ = qkv_BSN.shape
    H, G, d = q_BSHd.shape[2], k_BSGd.shape[2], q_BSHd.shape[3]
    if B * S == 0:
        return
    norm = NORM_CODES[mode]
    nq, nk = (0, 0) if norm == 0 else (1, 1) if norm == 1 else (H, G)
    half = d // 2
    _qkv_heads_fwd_kernel[(B * S, 2)](
        qkv_BSN, qkv_BSN if w_q is None else w_q, qkv_BSN if w_k is None else w_k, cos_Sh, sin_Sh, q_BSHd, k_BSGd, rstd_TR,
        S, qkv_BSN.stride(0), qkv_BSN.stride(1), cos_Sh.stride(0), eps,
        H=H, G=G, HP=triton.next_power_of_2(H), GP=triton.next_power_of_2(G), HALF=half, HALFP=triton.next_power_of_2(half),
        NQ=nq, NK=nk, NORM=norm, num_warps=_warps(max(H, G), half),
    )


def qkv_heads_bwd_into(dq_BSHd: Tensor, dk_BSGd: Tensor, dv_BSGd: Tensor, qkv_BSN: Tensor | None, rstd_TR: Tensor, w_q: Tensor | None, w_k: Tensor | None,
                       cos_Sh: Tensor, sin_Sh: Tensor, mode: str, dqkv_BSN: Tensor, dwq_PW: Tensor, dwk_PW: Tensor) -> None:
    """Launch the backward: ``dq``, ``dk``, ``dv`` (any strides, unit-stride rows) -> contiguous ``dqkv`` and the
    fp32 weight-gradient partials ``dw*_PW`` (row p: the sum over rows p, p + P, ...; P = their first dim).
    ``qkv`` (unit-stride columns) is read only by the norms' backward: None for mode none."""
    B, S, H, d = dq_BSHd.shape
    G = dk_BSGd.shape[2]
    P = dwq_PW.shape[0]
    if B * S == 0:
        return
    norm = NORM_CODES[mode]
    nq, nk = (0, 0) if norm == 0 else (1, 1) if norm == 1 else (H, G)
    half = d // 2
    x = dq_BSHd if qkv_BSN is None else qkv_BSN  # a stand-in pointer where nothing is read
    _qkv_heads_bwd_kernel[(P, 3)](
        dq_BSHd, *dq_BSHd.stride()[:3], dk_BSGd, *dk_BSGd.stride()[:3], dv_BSGd, *dv_BSGd.stride()[:3], x, x.stride(0), x.stride(1),
        rstd_TR, x if w_q is None else w_q, x if w_k is None else w_k, cos_Sh, sin_Sh, cos_Sh.stride(0),
        dqkv_BSN, dwq_PW, dwk_PW, B * S, S, P,
        H=H, G=G, HP=triton.next_power_of_2(H), GP=triton.next_power_of_2(G), HALF=half, HALFP=triton.next_power_of_2(half),
        NQ=nq, NK=nk, NORM=norm, DP=triton.next_power_of_2(d), num_warps=_warps(max(H, G), half),
    )
