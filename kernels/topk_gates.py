"""The top-k router's gradient from its gates and losses back to its logits, as one kernel.

Shape legend: T tokens, E experts, K slots per token; BT the tokens of one program, BE the
experts padded to a power of two.

Per token row ``t`` (``moe.routers.topk_gates`` derives it; Fedus et al. 2021 eq. 4 for the
balance loss, Zoph et al. 2022 eq. 5 for the z-loss)::

    dv_k  = (dw_k - sum_j dw_j w_j) / s        (renormalised top-k weights w = v / s; else dv = dw)
    dp_e  = a f_e + dprobs_e + sum_k [ids_k = e] dv_k      (a = daux * aux_scale)
    dh_e  = p_e (dp_e - sum_e' dp_e' p_e') + z lse p_e     (z = dz * z_scale)

in fp32. Torch's closed form needs 11 kernels for this (``kernels.reference.topk_gates_bwd``);
here each input is read once and ``dh`` written once. Absent inputs (no renormalisation, a zero
loss coefficient, no gradient into the probabilities or the gates) are constexpr-off branches.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

ELEMENTS_PER_PROGRAM = 2048
"""BT * BE, 16 values per thread of 4 warps: no register spills on sm_90 at E = 8..128, K = 2..8
(``tools.bench.compile_check``), and 3-4 programs resident per SM."""


@triton.jit
def _topk_gates_bwd_kernel(p_ptr, w_ptr, ids_ptr, dw_ptr, s_ptr, dp_ptr, f_ptr, daux_ptr, lse_ptr, dz_ptr, out_ptr,
                           T, E, aux_scale, z_scale,
                           K: tl.constexpr, HAS_DW: tl.constexpr, HAS_S: tl.constexpr, HAS_DP: tl.constexpr,
                           HAS_AUX: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    mask = rmask[:, None] & (cols < E)[None, :]
    at = rows[:, None] * E + cols[None, :]
    p = tl.load(p_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dp = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_AUX:
        f = tl.load(f_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
        a = tl.load(daux_ptr).to(tl.float32) * aux_scale
        dp += (f * a)[None, :]
    if HAS_DP:
        dp += tl.load(dp_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_DW:
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if HAS_S:
            for k in tl.static_range(K):
                dw_k = tl.load(dw_ptr + rows * K + k, mask=rmask, other=0.0).to(tl.float32)
                w_k = tl.load(w_ptr + rows * K + k, mask=rmask, other=0.0).to(tl.float32)
                dot += dw_k * w_k
            s = tl.load(s_ptr + rows, mask=rmask, other=1.0).to(tl.float32)
        for k in tl.static_range(K):
            dv_k = tl.load(dw_ptr + rows * K + k, mask=rmask, other=0.0).to(tl.float32)
            if HAS_S:
                dv_k = (dv_k - dot) / s
            e_k = tl.load(ids_ptr + rows * K + k, mask=rmask, other=-1)
            dp += tl.where(e_k[:, None] == cols[None, :], dv_k[:, None], 0.0)
    c = tl.sum(dp * p, axis=1)
    dh = p * (dp - c[:, None])
    if HAS_Z:
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        z = tl.load(dz_ptr).to(tl.float32) * z_scale
        dh += p * (lse * z)[:, None]
    tl.store(out_ptr + at, dh, mask=mask)


def topk_gates_bwd_into(probs_TE: Tensor, weights_TK: Tensor, ids_TK: Tensor, dweights_TK: Tensor | None, sums_T: Tensor | None,
                        dprobs_TE: Tensor | None, f_E: Tensor | None, daux: Tensor | None, lse_T: Tensor | None, dz: Tensor | None,
                        aux_scale: float, z_scale: float, out_TE: Tensor) -> None:
    """Launch the kernel (module docstring) into ``out_TE`` (fp32 [T, E]); every tensor contiguous, the
    absent ones None (``sums_T`` needs ``dweights_TK``; ``f_E`` with ``daux``; ``lse_T`` with ``dz``)."""
    T, E = probs_TE.shape
    if T == 0:
        return
    K = ids_TK.shape[1]
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, ELEMENTS_PER_PROGRAM // block_e))
    stand_in = probs_TE  # any tensor, for the pointers of absent inputs (never read)
    _topk_gates_bwd_kernel[(triton.cdiv(T, block_t),)](
        probs_TE, weights_TK, ids_TK, dweights_TK if dweights_TK is not None else stand_in, sums_T if sums_T is not None else stand_in,
        dprobs_TE if dprobs_TE is not None else stand_in, f_E if f_E is not None else stand_in, daux if daux is not None else stand_in,
        lse_T if lse_T is not None else stand_in, dz if dz is not None else stand_in, out_TE,
        T, E, aux_scale, z_scale,
        K=K, HAS_DW=dweights_TK is not None, HAS_S=sums_T is not None and dweights_TK is not None, HAS_DP=dprobs_TE is not None,
        HAS_AUX=daux is not None and f_E is not None, HAS_Z=dz is not None and lse_T is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
    )
