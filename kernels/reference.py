"""Pure-torch references of every kernel op: same signatures as the Triton versions.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K slots per token,
S slots (T*K), R routed rows (expert-sorted kept slots), N tiles.

These are the slow, obviously-correct versions the tests compare the Triton kernels against,
and the CPU path when Triton cannot run. Autograd comes from torch; everything is
deterministic. Row layout and tile schedule: see ``kernels.layout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.layout import TileSchedule, max_tiles


def tile_schedule(counts_E: Tensor, num_rows: int, block_m: int) -> TileSchedule:
    """Offsets and fixed-length tile schedule by a Python loop over experts."""
    E = counts_E.shape[0]
    n_tiles = max_tiles(num_rows, E, block_m)
    counts = [int(c) for c in counts_E.tolist()]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    experts, starts = [], []
    for e, c in enumerate(counts):
        for i in range((c + block_m - 1) // block_m):
            experts.append(e)
            starts.append(offsets[e] + i * block_m)
    pad = n_tiles - len(experts)
    dev = counts_E.device
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return TileSchedule(as_i32(offsets), as_i32(experts + [-1] * pad), as_i32(starts + [0] * pad), block_m)


def route_meta(expert_ids_TK: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, TileSchedule]:
    """Stable sort of the token-major slots by expert, and the tile schedule."""
    ids_S = expert_ids_TK.reshape(-1)
    sorted_S = torch.sort(ids_S, stable=True).indices.to(torch.int32)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_S.device)
    counts_E.scatter_add_(0, ids_S.long(), torch.ones_like(ids_S, dtype=torch.int64))
    return sorted_S, tile_schedule(counts_E, ids_S.shape[0], block_m)


def _segments(schedule: TileSchedule) -> list[tuple[int, int]]:
    offsets = schedule.expert_offsets_E1.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def gather_gmm_swiglu(x_TD: Tensor, slot_idx_R: Tensor, schedule: TileSchedule, K: int, w_gate_EDF: Tensor, w_up_EDF: Tensor) -> Tensor:
    """``h_RF[r] = silu(x[t_r] Wg[e_r]) * (x[t_r] Wu[e_r])`` with ``t_r = slot_idx_R[r] // K`` (Shazeer 2020, SwiGLU)."""
    x_RD = x_TD[slot_idx_R.long() // K]
    out = [F.silu(x_RD[a:b] @ w_gate_EDF[e]) * (x_RD[a:b] @ w_up_EDF[e]) for e, (a, b) in enumerate(_segments(schedule))]
    return torch.cat(out) if out else x_RD.new_zeros(0, w_gate_EDF.shape[-1])


def gather_gmm(a_XD: Tensor, slot_idx_R: Tensor, row_div: int, schedule: TileSchedule, w_EDN: Tensor) -> Tensor:
    """Plain gathered grouped GEMM: ``c_RN[r] = a_XD[slot_idx_R[r] // row_div] @ w_EDN[e_r]``."""
    a_RD = a_XD[slot_idx_R.long() // row_div]
    out = [a_RD[a:b] @ w_EDN[e] for e, (a, b) in enumerate(_segments(schedule))]
    return torch.cat(out) if out else a_RD.new_zeros(0, w_EDN.shape[-1])


def gmm_scatter(h_RF: Tensor, weight_R: Tensor, slot_idx_R: Tensor, schedule: TileSchedule, w_down_EFD: Tensor, num_slots: int) -> Tensor:
    """``y_SD[slot_idx_R[r]] = weight_R[r] * (h_RF[r] @ Wd[e_r])``; slots without a row are 0."""
    y_SD = h_RF.new_zeros(num_slots, w_down_EFD.shape[-1])
    for e, (a, b) in enumerate(_segments(schedule)):
        rows_D = (h_RF[a:b] @ w_down_EFD[e]).float() * weight_R[a:b, None].float()
        y_SD = y_SD.index_copy(0, slot_idx_R[a:b].long(), rows_D.to(h_RF.dtype))
    return y_SD


def combine(y_SD: Tensor, K: int) -> Tensor:
    """``y_TD[t] = sum_j y_SD[t*K + j]``, summed in fp32."""
    S, D = y_SD.shape
    return y_SD.float().reshape(S // K, K, D).sum(1).to(y_SD.dtype)


def grouped_wgrad(
    a_XM: Tensor, a_div: int | None, b_YN: Tensor, b_div: int | None, slot_idx_R: Tensor, expert_offsets_E1: Tensor, scale_R: Tensor | None = None,
) -> Tensor:
    """``dW_EMN[e] = sum over rows r of e of a[r]^T (scale_R[r] * b[r])`` in fp32, zeros for empty experts.

    Row r of ``a`` is ``a_XM[slot_idx_R[r] // a_div]`` (gathered) or ``a_XM[r]`` when
    ``a_div`` is None (already expert-sorted); the same for ``b``.
    """
    rows = lambda t, div: t.float() if div is None else t[slot_idx_R.long() // div].float()  # noqa: E731
    a_RM, b_RN = rows(a_XM, a_div), rows(b_YN, b_div)
    if scale_R is not None:
        b_RN = b_RN * scale_R.float()[:, None]
    offsets = expert_offsets_E1.tolist()
    out = [a_RM[s:t].T @ b_RN[s:t] for s, t in zip(offsets[:-1], offsets[1:])]
    return torch.stack(out).to(a_XM.dtype)


def moe_experts(
    x_TD: Tensor, slot_idx_R: Tensor, weight_R: Tensor, counts_E: Tensor, K: int, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor,
) -> Tensor:
    """Whole expert block: gather -> per-expert SwiGLU -> weighted combine over each token's rows."""
    T = x_TD.shape[0]
    x_RD = x_TD[slot_idx_R.long() // K]
    out = []
    for e, rows_D in enumerate(torch.split(x_RD, counts_E.tolist())):
        out.append((F.silu(rows_D @ w_gate_EDF[e]) * (rows_D @ w_up_EDF[e])) @ w_down_EFD[e])
    y_RD = torch.cat(out) if out else x_RD.new_zeros(0, w_down_EFD.shape[-1])
    weighted_RD = y_RD.float() * weight_R.float()[:, None]
    y_TD = torch.zeros(T, y_RD.shape[-1], dtype=torch.float32, device=x_TD.device)
    return y_TD.index_add(0, slot_idx_R.long() // K, weighted_RD).to(x_TD.dtype)


def swiglu_act(g_RF: Tensor, u_RF: Tensor, s_R: Tensor | None = None) -> Tensor:
    """``h_RF = s_R * silu(g_RF) * u_RF`` in fp32, returned in g's dtype (``kernels.swiglu_act``)."""
    acc = torch.promote_types(g_RF.dtype, torch.float32)
    h = F.silu(g_RF.to(acc)) * u_RF.to(acc)
    if s_R is not None:
        h = h * s_R.to(acc)[:, None]
    return h.to(g_RF.dtype)


def swiglu_act_bwd(g_RF: Tensor, u_RF: Tensor, a_RF: Tensor, s_R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of ``swiglu_act`` for the output gradient ``a_RF``, term by term in fp32:
    ``du = a s silu(g)``, ``dg = a s u silu'(g)``, ``ds_r = sum_f a silu(g) u`` with
    ``silu'(g) = sig(g) (1 + g (1 - sig(g)))``. (Tests check it against autograd in fp64.)"""
    acc = torch.promote_types(g_RF.dtype, torch.float32)
    g, u, a = g_RF.to(acc), u_RF.to(acc), a_RF.to(acc)
    sig = torch.sigmoid(g)
    ds = None if s_R is None else (a * g * sig * u).sum(-1).to(s_R.dtype)
    if s_R is not None:
        a = a * s_R.to(acc)[:, None]
    return (a * u * sig * (1 + g * (1 - sig))).to(g_RF.dtype), (a * g * sig).to(u_RF.dtype), ds


def unpermute(y_RD: Tensor, y2_RD: Tensor | None, pos_S: Tensor, K: int, s_R: Tensor | None = None) -> Tensor:
    """``out_TD[t] = sum_j s[p] * (y[p] + y2[p])`` over ``p = pos_S[t*K + j] >= 0``, summed in fp32 (or fp64)."""
    S, D = pos_S.shape[0], y_RD.shape[1]
    acc = torch.promote_types(y_RD.dtype, torch.float32)
    rows = y_RD.to(acc) if y2_RD is None else y_RD.to(acc) + y2_RD.to(acc)
    if s_R is not None:
        rows = rows * s_R.to(acc)[:, None]
    # A zero row at index R stands in for slots without a row; then gather and sum over K.
    rows = torch.cat([rows, rows.new_zeros(1, D)])
    idx_S = torch.where(pos_S >= 0, pos_S.long(), rows.shape[0] - 1)
    return rows[idx_S].reshape(S // K, K, D).sum(1).to(y_RD.dtype)


def cross_entropy_rows(z_CV: Tensor, y_C: Tensor, scale: float, grad_dtype: torch.dtype, want_grad: bool,
                       inplace: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-row cross-entropy ``lse(z_c) - z_{c y_c}`` of fp32 logits and, when ``want_grad``, the
    logit gradient ``(softmax(z_c) - onehot(y_c)) * scale`` in ``grad_dtype`` (``kernels.cross_entropy``).

    ``inplace``: the gradient is computed in ``z_CV``'s storage (the chunked loss's CPU path, which
    needs the logits no more); otherwise ``z_CV`` is left as it was.
    """
    lse_C = torch.logsumexp(z_CV, dim=-1)
    loss_C = lse_C - z_CV.gather(1, y_C[:, None]).squeeze(1)
    if not want_grad:
        return loss_C, None
    g_CV = (z_CV if inplace else z_CV.clone()).sub_(lse_C[:, None]).exp_()
    g_CV.scatter_add_(1, y_C[:, None], torch.full_like(lse_C[:, None], -1.0))
    return loss_C, g_CV.mul_(scale).to(grad_dtype)


def plan_indices(order_A: Tensor, weights_A: Tensor, K: int, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_of_slot_A, token_idx_R, weight_R)`` of a sorted slot order (formulas in ``kernels.plan_indices``)."""
    A = order_A.shape[0]
    position_A = torch.empty(A, dtype=torch.int32, device=order_A.device).scatter_(0, order_A, torch.arange(A, dtype=torch.int32, device=order_A.device))
    row_of_slot_A = position_A if num_rows == A else torch.where(position_A < num_rows, position_A, -1)
    slot_idx_R = order_A[:num_rows]
    return row_of_slot_A, torch.div(slot_idx_R, K, rounding_mode="floor"), weights_A.index_select(0, slot_idx_R)


def cast_many(xs: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each tensor converted to ``dtype`` (``Tensor.to``, fresh contiguous copies)."""
    return [x.to(dtype, memory_format=torch.contiguous_format, copy=True) for x in xs]


def topk_gates_bwd(probs_TE: Tensor, weights_TK: Tensor, ids_TK: Tensor, dweights_TK: Tensor | None, sums_T: Tensor | None,
                   dprobs_TE: Tensor | None, f_E: Tensor | None, daux: Tensor | None, lse_T: Tensor | None, dz: Tensor | None,
                   aux_scale: float, z_scale: float) -> Tensor:
    """fp32 gradient of the top-k router's logits from its gates and losses (formulas in ``kernels.topk_gates``)."""
    p = probs_TE.float()
    dp = torch.zeros_like(p)
    if daux is not None and f_E is not None:
        dp = dp + f_E.float()[None, :] * (daux.float() * aux_scale)
    if dprobs_TE is not None:
        dp = dp + dprobs_TE.float()
    if dweights_TK is not None:
        dv = dweights_TK.float()
        if sums_T is not None:
            dv = (dv - (dv * weights_TK.float()).sum(dim=-1, keepdim=True)) / sums_T.float()[:, None]
        dp = dp.scatter_add(1, ids_TK, dv)
    dh = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    if dz is not None and lse_T is not None:
        dh = dh + p * (lse_T.float() * (dz.float() * z_scale))[:, None]
    return dh


def rope(x_BHSd: Tensor, cos_Sh: Tensor, sin_Sh: Tensor, inverse: bool) -> Tensor:
    """Rotary embedding of the (first half, second half) pairs by each position's angle, or by its
    negative when ``inverse`` (the backward), in fp32, returned in x's dtype (``kernels.rope``)."""
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    sin = -sin_Sh if inverse else sin_Sh
    return torch.cat([x1 * cos_Sh - x2 * sin, x1 * sin + x2 * cos_Sh], dim=-1).to(x_BHSd.dtype)


def _rotate(x_BShd: Tensor, cos_Sh: Tensor, sin_Sh: Tensor, inverse: bool) -> Tensor:
    """RoPE's half-split rotation of [B, S, heads, d] (Su et al. 2021, eq. 34), by minus the angle when ``inverse``."""
    x1, x2 = x_BShd.chunk(2, dim=-1)
    c, s = cos_Sh[:, None, :].to(x_BShd.dtype), sin_Sh[:, None, :].to(x_BShd.dtype)
    s = -s if inverse else s
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def _group_rms(x_BShd: Tensor, mode: str) -> tuple[int, ...]:
    """Dimensions one 1/rms is taken over: the whole part row (full) or each head (per_head)."""
    return (-2, -1) if mode == "full" else (-1,)


def qkv_heads(qkv_BSN: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos_Sh: Tensor, sin_Sh: Tensor, H: int, G: int, mode: str,
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``q [B, S, H, d]``, ``k [B, S, G, d]`` (qkv's dtype) and fp32 ``rstd`` [T, nq + nk] of the fused projection:
    the q and k parts RMS-normalised (``mode`` full: over the whole part; per_head: per head; none: not at all) times
    their weight, then rotated by RoPE, all in fp32 (``kernels.qkv_heads``; the eager chain of ``moe.model.Attention``)."""
    B, S, N = qkv_BSN.shape
    d = N // (H + 2 * G)
    acc = torch.promote_types(qkv_BSN.dtype, torch.float32)
    outs, rstds = [], []
    for x, w, heads in zip((qkv_BSN[..., : H * d], qkv_BSN[..., H * d : (H + G) * d]), (w_q, w_k), (H, G)):
        x = x.to(acc).reshape(B, S, heads, d)
        if mode != "none":
            rstd = torch.rsqrt(x.pow(2).mean(_group_rms(x, mode), keepdim=True) + eps)
            x = x * rstd * w.to(acc).reshape(-1, d)
            rstds.append(rstd.reshape(B * S, -1).float())
        outs.append(_rotate(x, cos_Sh, sin_Sh, False).to(qkv_BSN.dtype))
    rstd_TR = torch.cat(rstds, dim=1) if rstds else qkv_BSN.new_zeros(B * S, 0, dtype=torch.float32)
    return outs[0], outs[1], rstd_TR


def program_partials(rows_TW: Tensor, programs: int) -> Tensor:
    """[P, W] sums of ``rows_TW`` over the rows each backward program walks: row p sums rows p, p + P, p + 2P, ..."""
    T, W = rows_TW.shape
    padded = rows_TW.new_zeros(-(-T // programs) * programs, W)
    padded[:T] = rows_TW
    return padded.reshape(-1, programs, W).sum(0)


def qkv_heads_bwd(dq_BSHd: Tensor, dk_BSGd: Tensor, dv_BSGd: Tensor, qkv_BSN: Tensor | None, rstd_TR: Tensor, w_q: Tensor | None, w_k: Tensor | None,
                  cos_Sh: Tensor, sin_Sh: Tensor, mode: str, programs: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``qkv_heads`` and of the value view: ``dqkv [B, S, N]`` (dq's dtype) and the fp32 weight-gradient
    partials [P, width] (``program_partials``; width H*d / G*d for full, d for per_head, 0 for none), term by term in
    fp32 (``qkv``, read only by the norms, may be None for mode none)::

        dy = RoPE^-1(do)     dw = sum_rows dy n     dx = r (dy w - n mean(dy w n))     with n = x r."""
    B, S, H, d = dq_BSHd.shape
    G = dk_BSGd.shape[2]
    acc = torch.promote_types(dq_BSHd.dtype, torch.float32)
    xs = (None, None) if qkv_BSN is None else (qkv_BSN[..., : H * d], qkv_BSN[..., H * d : (H + G) * d])
    widths = {"none": (0, 0), "full": (1, 1), "per_head": (H, G)}[mode]
    rstd_split = rstd_TR.split(list(widths), dim=1)
    dxs, dws = [], []
    for do, x, w, rstd, heads in zip((dq_BSHd, dk_BSGd), xs, (w_q, w_k), rstd_split, (H, G)):
        dy = _rotate(do.to(acc), cos_Sh, sin_Sh, True)
        if mode == "none":
            dxs.append(dy)
            dws.append(dy.new_zeros(programs, 0, dtype=torch.float32))
            continue
        r = rstd.to(acc).reshape(B, S, -1, 1)
        n = x.to(acc).reshape(B, S, heads, d) * r
        dw_rows = (dy * n).reshape(B * S, heads * d) if mode == "full" else (dy * n).sum(2).reshape(B * S, d)
        dws.append(program_partials(dw_rows.float(), programs))
        dn = dy * w.to(acc).reshape(-1, d)
        dxs.append(r * (dn - n * (dn * n).mean(_group_rms(n, mode), keepdim=True)))
    dxs.append(dv_BSGd.to(acc))
    dqkv = torch.cat([t.reshape(B, S, -1) for t in dxs], dim=-1).to(dq_BSHd.dtype)
    return dqkv, dws[0], dws[1]


def rms_norm(x: Tensor, weight_D: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4) of the rows of ``x`` in fp32: ``(x rstd w`` in
    ``out_dtype``, ``rstd = 1 / sqrt(mean(x^2) + eps)`` in fp32) (``kernels.rms_norm``)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[..., None] * weight_D.to(acc)).to(out_dtype), rstd.float()


def rms_norm_backward(dy: Tensor, x: Tensor, weight_D: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``rms_norm``, term by term in fp32: with ``xh = x rstd`` and ``g = dy w``,
    ``dx = rstd (g - xh mean(g xh))`` in x's dtype and ``dw = sum over rows of dy xh`` in fp32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    r = rstd.to(acc)[..., None]
    xh = x.to(acc) * r
    g = dy.to(acc) * weight_D.to(acc)
    dx = r * (g - xh * (g * xh).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dy.to(acc) * xh).reshape(-1, x.shape[-1]).sum(0).float()


def add_rms_norm(x: Tensor, a: Tensor, weight_D: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(h, y, rstd)``: the residual sum ``h = x + a`` (promoted dtype) and ``rms_norm(h)``."""
    h = x + a
    return (h, *rms_norm(h, weight_D, eps, out_dtype))


def add_rms_norm_backward(dh: Tensor | None, dy: Tensor, h: Tensor, weight_D: Tensor, rstd: Tensor, a_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``add_rms_norm``: ``dx = dh + (the norm's dx)`` (no ``dh``: the norm's alone) in h's
    dtype, ``da`` = those values in ``a_dtype``, fp32 ``dw``."""
    dn, dw = rms_norm_backward(dy, h.to(torch.promote_types(h.dtype, torch.float32)), weight_D, rstd)
    dx = dn if dh is None else dh.to(dn.dtype) + dn
    return dx.to(h.dtype), dx.to(a_dtype), dw


@torch.no_grad()
def adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """One AdamW step in place (``kernels.adamw``'s formula): fp32 math, moments stored in their own dtype.

    The update follows ``torch.optim.AdamW``'s single-tensor path operation by operation (decay, lerp,
    ``mul_``/``addcmul_``, ``sqrt / sqrt(bc2) + eps``, ``addcdiv``), with the bias corrections formed
    from the device step count ``step`` (the count after this step) in fp32. Where ``found_inf`` is
    nonzero nothing changes (``torch.where`` against the old values; no host read).
    """
    g32 = g.float() if grad_scale is None else g.float() / grad_scale.float()
    t = step.float()
    p32 = p.float() * (1.0 - lr * weight_decay)
    m32 = torch.lerp(m.float(), g32, 1.0 - beta1)
    v32 = (v.float() * beta2).addcmul_(g32, g32, value=1.0 - beta2)
    step_size = lr / (1.0 - torch.pow(beta1, t))
    denom = v32.sqrt() / torch.sqrt(1.0 - torch.pow(beta2, t)) + eps
    p32 = p32 - step_size * (m32 / denom)
    for dst, new in ((p, p32), (m, m32), (v, v32)):
        new = new.to(dst.dtype)
        dst.copy_(new if found_inf is None else torch.where(found_inf == 0, new, dst))


@torch.no_grad()
def adamw_master_(p: Tensor, out: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """``adamw_`` of the fp32 master ``p`` with the (bf16) gradient ``g``, then the bf16 parameter ``out`` = the new
    master rounded to nearest even (``Tensor.to``); where ``found_inf`` is nonzero nothing changes, ``out`` included."""
    adamw_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
    new = p.to(out.dtype)
    out.copy_(new if found_inf is None else torch.where(found_inf == 0, new, out))
