"""``experts.backend=grouped_mm``: library grouped GEMMs, and glue written for memory bandwidth.

Shape letters: the ``moe`` package legend (T tokens, D model dim, F expert ffn dim, E experts,
K slots per token, A = T*K slots, R expert-sorted rows).

Every GEMM is ``torch._grouped_mm`` (torch >= 2.9; on Hopper a CUTLASS grouped GEMM that ran the
nine GEMMs of a layer step at 667-707 TFLOP/s on an H200, against 154-252 for our Triton backward
kernels); everything else is one pass per step, no atomics, no host synchronisation:

forward   ``x_RD = x_TD[t_r]`` (one gather) -> ``g = x Wg``, ``u = x Wu`` (grouped) ->
          ``h = w_r * silu(g) * u`` (``moeforge::swiglu_act``: the router weight folded in, so the
          down projection's rows are already weighted) -> ``y_RD = h Wd`` (grouped) ->
          ``y_TD[t] = sum of t's rows`` (``moeforge::unpermute``: a gather through the inverse
          permutation, fp32 sum in slot order).
backward  ``dy_RD = dy_TD[t_r]`` (one gather) -> ``a = dy Wd^T``, ``dWd = h^T dy`` (grouped) ->
          ``dg, du, dw_r`` in one pass, written over g and u (``moeforge::swiglu_act_bwd_``) ->
          ``dg Wg^T``, ``dWg = x^T dg``, ``du Wu^T``, ``dWu = x^T du`` (grouped) -> ``dx_TD`` = one
          unpermute summing both dgrads.

The fp32 master weights reach the GEMMs as bf16 copies, and their gradients return to fp32, in one
launch each way for the three weights (``moe.expert_backends.weight_cast``).

That is 9 grouped GEMMs (18*R*D*F FLOPs) and 7 memory passes moving ``7RD + 8RF + 2TD`` elements
(the layer budget test counts them). Gate and up stay two GEMMs because the weights are stored
as separate parameters (checkpoints, FSSDP chunks and EvoMoE's spawn address them by name); the
cost against one [D, 2F] GEMM is one extra read of an R*D tensor in the backward's unpermute.
Kept for backward: x_RD, g, u, h (R*D + 3*R*F, less than autograd through a plain layer keeps),
each dropped as soon as the backward has consumed it, and the SwiGLU gradients overwrite g and u,
so the backward allocates no R x F buffer beyond the dgrad ``a`` and its peak stays at or below
the plain layer's.

Outside Hopper, torch's grouped GEMM falls back to a per-group loop that reads the offsets on the
host (a synchronisation); on the CPU it runs too (tests), with the pure-torch twins of the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import ops
from moe.errors import check
from moe.expert_backends.base import ExpertBackend, ExpertOptions
from moe.expert_backends.weight_cast import cast_weights


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _t(w: Tensor) -> Tensor:
    """The per-expert transpose of a stacked weight, ``[E, a, b] -> [E, b, a]``, as a view (no copy)."""
    return w.transpose(1, 2)


class _Activations:
    """The forward's R-row intermediates, held on ``ctx`` (not ``save_for_backward``) so the
    backward can drop each one the moment it is consumed; a second backward through the same
    graph (``retain_graph=True``) is refused with a clear error instead of reading freed memory."""

    def __init__(self, **tensors: Tensor) -> None:
        self.__dict__.update(tensors)

    def take(self, name: str) -> Tensor:
        try:
            return self.__dict__.pop(name)
        except KeyError:
            raise RuntimeError(
                "experts.backend=grouped_mm frees its activations during the backward; "
                "backward through the same layer step twice (retain_graph=True) is not supported"
            ) from None


class _RoutedSwiGLU(torch.autograd.Function):
    """The whole expert block over a dispatch plan (module docstring)."""

    @staticmethod
    def forward(ctx, x_TD, weight_R, w_gate_EDF, w_up_EDF, w_down_EFD, token_idx_R, row_of_slot_A, offs_E, K):  # type: ignore[override]
        x_RD = x_TD.index_select(0, token_idx_R)
        g_RF = _gmm(x_RD, w_gate_EDF, offs_E)
        u_RF = _gmm(x_RD, w_up_EDF, offs_E)
        h_RF = ops.swiglu_act(g_RF, u_RF, weight_R)
        y_TD = ops.unpermute(_gmm(h_RF, w_down_EFD, offs_E), None, row_of_slot_A, K, None)
        ctx.save_for_backward(weight_R, w_gate_EDF, w_up_EDF, w_down_EFD, token_idx_R, row_of_slot_A, offs_E)
        ctx.act = _Activations(x_RD=x_RD, g_RF=g_RF, u_RF=u_RF, h_RF=h_RF)
        ctx.K = K
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):  # type: ignore[override]
        weight_R, w_gate_EDF, w_up_EDF, w_down_EFD, token_idx_R, row_of_slot_A, offs_E = ctx.saved_tensors
        need, act = ctx.needs_input_grad, ctx.act
        dy_RD = dy_TD.contiguous().index_select(0, token_idx_R)
        a_RF = _gmm(dy_RD, _t(w_down_EFD), offs_E)  # dL/dh (h carries the router weight)
        h_RF = act.take("h_RF")
        dw_down = _gmm(h_RF.t(), dy_RD, offs_E) if need[4] else None
        del dy_RD, h_RF
        dg_RF, du_RF = act.take("g_RF"), act.take("u_RF")
        dweight_R = ops.swiglu_act_bwd_(dg_RF, du_RF, a_RF, weight_R)  # g, u become dg, du
        del a_RF
        x_RD = act.take("x_RD")
        dx_gate_RD = _gmm(dg_RF, _t(w_gate_EDF), offs_E) if need[0] else None
        dw_gate = _gmm(x_RD.t(), dg_RF, offs_E) if need[2] else None
        del dg_RF
        dx_up_RD = _gmm(du_RF, _t(w_up_EDF), offs_E) if need[0] else None
        dw_up = _gmm(x_RD.t(), du_RF, offs_E) if need[3] else None
        del du_RF, x_RD
        dx_TD = ops.unpermute(dx_gate_RD, dx_up_RD, row_of_slot_A, ctx.K, None) if need[0] else None
        return dx_TD, dweight_R if need[1] else None, dw_gate, dw_up, dw_down, None, None, None, None


class _SortedSwiGLU(torch.autograd.Function):
    """The grouped SwiGLU over rows already sorted by expert (EP/FSSDP): no gather, no combine."""

    @staticmethod
    def forward(ctx, x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, offs_E):  # type: ignore[override]
        g_RF = _gmm(x_RD, w_gate_EDF, offs_E)
        u_RF = _gmm(x_RD, w_up_EDF, offs_E)
        h_RF = ops.swiglu_act(g_RF, u_RF, None)
        ctx.save_for_backward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, offs_E)
        ctx.act = _Activations(g_RF=g_RF, u_RF=u_RF, h_RF=h_RF)
        return _gmm(h_RF, w_down_EFD, offs_E)

    @staticmethod
    def backward(ctx, dy_RD):  # type: ignore[override]
        x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, offs_E = ctx.saved_tensors
        need, act = ctx.needs_input_grad, ctx.act
        dy_RD = dy_RD.contiguous()
        a_RF = _gmm(dy_RD, _t(w_down_EFD), offs_E)
        h_RF = act.take("h_RF")
        dw_down = _gmm(h_RF.t(), dy_RD, offs_E) if need[3] else None
        del dy_RD, h_RF
        dg_RF, du_RF = act.take("g_RF"), act.take("u_RF")
        ops.swiglu_act_bwd_(dg_RF, du_RF, a_RF, None)
        del a_RF
        dx_RD = _gmm(dg_RF, _t(w_gate_EDF), offs_E).add_(_gmm(du_RF, _t(w_up_EDF), offs_E)) if need[0] else None
        dw_gate = _gmm(x_RD.t(), dg_RF, offs_E) if need[1] else None
        dw_up = _gmm(x_RD.t(), du_RF, offs_E) if need[2] else None
        return dx_RD, dw_gate, dw_up, dw_down, None


def _offsets(counts_E: Tensor) -> Tensor:
    """int32 inclusive scan of the counts: the end row of each expert (``torch._grouped_mm``'s ``offs``)."""
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


class GroupedMMBackend(ExpertBackend):
    name = "grouped_mm"

    def reads_counts_on_host(self, device: torch.device) -> bool:
        """Below sm_90 torch._grouped_mm loops over the groups with offsets read on the host."""
        return device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0)

    def unavailable(self, device: torch.device) -> str | None:
        if not hasattr(torch, "_grouped_mm"):
            return f"needs torch >= 2.9 (torch._grouped_mm); this is {torch.__version__}"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "torch._grouped_mm needs CUDA compute capability >= 8.0"
        return None

    def check_shapes(self, d_model: int, d_ff: int) -> None:
        for key, value in (("d_model", d_model), ("d_ff", d_ff)):
            check(value % 8 == 0, f"model.{key}", value, f"must be a multiple of 8 for experts.backend={self.name} (16-byte aligned rows)")

    def grouped(self, x_RD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        w = cast_weights((w_gate_EDF, w_up_EDF, w_down_EFD), x_RD.dtype)
        return _SortedSwiGLU.apply(x_RD.contiguous(), *w, _offsets(counts_E))

    def run_plan(self, x_TD: Tensor, plan: object, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor, options: ExpertOptions) -> Tensor:
        w = cast_weights((w_gate_EDF, w_up_EDF, w_down_EFD), x_TD.dtype)
        return _RoutedSwiGLU.apply(
            x_TD.contiguous(), plan.weight_R, *w, plan.token_idx_R, plan.row_of_slot_A, _offsets(plan.counts_E), plan.slots_per_token,
        )
