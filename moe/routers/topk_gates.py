"""Top-k softmax gates and their auxiliary losses as one autograd node, for the GPU.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, E experts, K slots.

``gates`` is what ``moe.routers.topk`` computes from the router logits ``h_TE``, op by op: the
softmax ``p = softmax(h)``, the top-k ``v_TK, ids_TK``, the weights ``w = v / s`` with
``s = sum_k v`` (or ``w = v`` without renormalisation), the slot counts, the Switch balance loss
``c_a E sum_e f_e P_e`` (Fedus et al. 2021, eq. 4; ``f`` a count, no gradient) and the z-loss
``c_z mean_t lse_t^2`` (Zoph et al. 2022, eq. 5). Autograd differentiates that chain in about
25 small kernels per layer step (each op's backward, and the adds where paths meet).

``fused_gates`` runs the same forward ops (the same values, bit for bit) inside one
``torch.autograd.Function`` whose backward is the closed form, one kernel on a GPU
(``moeforge::topk_gates_bwd``, ``kernels.topk_gates``; its torch twin elsewhere):

- renormalisation: ``dv = (g_w - sum_k g_w w) / s`` (or ``dv = g_w``);
- the probabilities' gradient: ``dp_te = g_aux c_a E f_e / T`` everywhere, plus ``dv`` at the
  selected experts (no two slots of a row pick the same expert), plus any gradient of ``p`` itself;
- the softmax: ``dh = p (dp - sum_e dp p)``;
- the z-loss: ``dh += g_z c_z (2 lse_t / T) p_te`` (``d lse_t / d h_te = p_te``).

It agrees with autograd through ``gates`` to fp32 rounding, not bit for bit (the sums run in
another order), so the top-k router uses it on GPUs (and ``meta``, which the budget tools count
as a GPU) and keeps autograd on the CPU, whose runs stay bit-identical to before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import ops
from moe.routers.losses import CountSum, balance_fraction, balance_loss_of_fraction, slot_counts, z_loss_of_lse


@dataclass(frozen=True)
class Gates:
    """The outputs of ``gates``; ``aux``/``z`` are None when their coefficient is 0."""

    probs_TE: Tensor
    weights_TK: Tensor
    ids_TK: Tensor
    counts_E: Tensor
    aux: Tensor | None
    z: Tensor | None
    sum_TK1: Tensor | None
    """``s``, the top-k probabilities' sum (None without renormalisation); kept for the backward."""
    f_E: Tensor | None
    lse_T: Tensor | None


def gates(
    logits_TE: Tensor, k: int, renorm: bool, aux_loss_coef: float, z_loss_coef: float, sum_counts: CountSum | None = None,
    probs_TE: Tensor | None = None, total_on_host: bool = False,
) -> Gates:
    """Top-k gates of ``softmax(logits_TE)`` with the Switch balance and z losses (module docstring), in
    autograd-visible ops: the reference of ``fused_gates``, and its forward. ``probs_TE``: select on
    this distribution instead (routers that mix the softmax across tokens or experts); the z-loss
    still reads ``logits_TE``. ``total_on_host``: divide the balance loss's counts by the slot total
    the host knows (``T*K`` in one process, below 2^24) instead of summing them on the device; the
    same division by the same value, so the same bits, in 2 launches instead of 4 (``fused_gates``)."""
    probs_TE = torch.softmax(logits_TE, dim=-1) if probs_TE is None else probs_TE
    v_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
    sum_TK1 = v_TK.sum(dim=-1, keepdim=True) if renorm else None
    weights_TK = v_TK / sum_TK1 if renorm else v_TK
    counts_E = slot_counts(ids_TK, probs_TE.shape[1])
    slots = ids_TK.numel()
    if aux_loss_coef > 0 and total_on_host and sum_counts is None and 0 < slots < 2**24:
        # counts / sum(counts) with the sum known: int64 counts (exact in fp32) over an fp32 0-dim device tensor.
        f_E = torch.div(counts_E, torch.full((), float(slots), dtype=probs_TE.dtype, device=probs_TE.device))
    else:
        f_E = balance_fraction(counts_E, probs_TE.dtype, sum_counts) if aux_loss_coef > 0 else None
    aux = aux_loss_coef * balance_loss_of_fraction(probs_TE, f_E) if f_E is not None else None
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1) if z_loss_coef > 0 else None
    z = z_loss_coef * z_loss_of_lse(lse_T) if lse_T is not None else None
    return Gates(probs_TE, weights_TK, ids_TK, counts_E, aux, z, sum_TK1, f_E, lse_T)


def fused_gates(logits_TE: Tensor, k: int, renorm: bool, aux_loss_coef: float, z_loss_coef: float, sum_counts: CountSum | None = None) -> Gates:
    """``gates`` with the closed-form backward (module docstring); the same forward values."""
    probs_TE, weights_TK, ids_TK, counts_E, aux, z = _FusedGates.apply(logits_TE, k, renorm, aux_loss_coef, z_loss_coef, sum_counts)
    return Gates(probs_TE, weights_TK, ids_TK, counts_E, aux, z, None, None, None)


class _FusedGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE: Tensor, k: int, renorm: bool, aux_loss_coef: float, z_loss_coef: float, sum_counts: CountSum | None):  # type: ignore[override]
        g = gates(logits_TE, k, renorm, aux_loss_coef, z_loss_coef, sum_counts, total_on_host=True)
        ctx.save_for_backward(g.probs_TE, g.weights_TK, g.ids_TK, g.sum_TK1, g.f_E, g.lse_T)
        ctx.aux_loss_coef, ctx.z_loss_coef = aux_loss_coef, z_loss_coef
        ctx.mark_non_differentiable(g.ids_TK, g.counts_E)
        ctx.set_materialize_grads(False)
        return g.probs_TE, g.weights_TK, g.ids_TK, g.counts_E, g.aux, g.z

    @staticmethod
    def backward(ctx, dprobs_TE, dweights_TK, _ids, _counts, daux, dz):  # type: ignore[override]
        probs_TE, weights_TK, ids_TK, sum_TK1, f_E, lse_T = ctx.saved_tensors
        T, E = probs_TE.shape
        dlogits_TE = ops.topk_gates_bwd(
            probs_TE, weights_TK, ids_TK, dweights_TK, None if sum_TK1 is None else sum_TK1.reshape(T), dprobs_TE,
            f_E, daux, lse_T, dz, ctx.aux_loss_coef * E / max(T, 1), 2.0 * ctx.z_loss_coef / max(T, 1),
        )
        return dlogits_TE.to(probs_TE.dtype), None, None, None, None, None
