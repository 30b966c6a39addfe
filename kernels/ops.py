"""The memory-bound expert-path ops as PyTorch operators: one op, one launch, any device.

Shape legend: T tokens, D model dim, F expert ffn dim, K slots per token, S slots (T*K),
R expert-sorted rows.

Each op is a PyTorch operator in the ``moeforge`` namespace (``torch.ops.moeforge.*``):

- ``moeforge::swiglu_act(g, u, scale)``: ``scale * silu(g) * u`` (``kernels.swiglu_act``);
- ``moeforge::swiglu_act_bwd_(g, u, a, scale)``: its gradients, ``dg`` and ``du`` written over
  ``g`` and ``u`` in place, ``dscale`` returned;
- ``moeforge::unpermute(y, y2, pos, K, scale)``: token-order sum of expert-sorted rows
  (``kernels.unpermute``);
- ``moeforge::cross_entropy_rows(z, y, scale, grad_dtype, want_grad)``: per-row cross-entropy of
  fp32 logits and the logit gradient in ``grad_dtype`` (``kernels.cross_entropy``), the chunked
  loss's one kernel per chunk on a GPU (``moe.head_loss``);
- ``moeforge::rope(x, cos, sin, inverse)``: rotary embedding of ``[B, H, S, d]`` heads, or its
  backward with ``inverse`` (``kernels.rope``; ``moe.model.apply_rope`` on a GPU);
- ``moeforge::rms_norm(x, weight, eps, out_dtype)``: RMSNorm rows in ``out_dtype`` and each row's
  ``1/rms`` (``kernels.rms_norm``; ``moe.model.RMSNorm`` on a GPU);
- ``moeforge::rms_norm_backward(dy, x, weight, rstd)``: its ``dx`` (x's dtype) and fp32 ``dw``;
- ``moeforge::add_rms_norm(x, a, weight, eps, out_dtype)``: the residual sum ``h = x + a`` and its
  RMSNorm in one pass, and ``moeforge::add_rms_norm_backward(dh, dy, h, weight, rstd, a_dtype)``
  (``moe.model.RMSNorm`` with a ``residual``, on a GPU);
- ``moeforge::qkv_heads(qkv, w_q, w_k, cos, sin, H, G, mode, eps)`` and ``qkv_heads_bwd``:
  attention's fused projection to its q/k-normed, rotated heads and back, one kernel each way
  (``kernels.qkv_heads``; ``moe.model.Attention`` on a GPU);
- ``moeforge::plan_indices(order, weights, K, num_rows)``: dispatch's inverse permutation, row
  tokens and row weights from the sorted slot order (``kernels.plan_indices``; ``moe.dispatch``);
- ``moeforge::cast_many(xs, dtype)``: up to three tensors converted between fp32 and bf16 in one launch
  (``kernels.cast_many``; the experts' weight casts, ``moe.expert_backends.weight_cast``);
- ``moeforge::topk_gates_bwd(probs, weights, ids, dweights, sums, dprobs, f, daux, lse, dz, aux_scale, z_scale)``:
  the top-k router's logit gradient from its gates, balance loss and z-loss (``kernels.topk_gates``;
  ``moe.routers.topk_gates`` on a GPU);
- ``moeforge::adamw_(p, g, m, v, step, lr, ...)``: one AdamW step of lists of parameter tensors in place,
  moments in bf16 or fp32, one launch for the lists (``kernels.adamw``; ``launch.kernel_adamw.KernelAdamW``).
- ``moeforge::adamw_master_(p, out, g, m, v, step, ...)``: the same over fp32 masters with bf16 gradients, also writing
  the bf16 parameters ``out`` (``optim.master_weights``).

Where a Triton kernel can run on the inputs' device (CUDA; or the CPU when the kernel module was
imported under ``TRITON_INTERPRET=1``) the op launches it; otherwise it runs the pure-torch
reference from ``kernels.reference``. A fake (meta) implementation gives output shapes, so a whole
layer step can run on ``meta`` tensors: ``torch.compile`` traces through the ops, and the layer
budget test counts each op as the one kernel launch it is on a GPU. Importing this module needs
only torch; Triton is imported lazily, and a missing Triton means the reference path.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from kernels import reference

_LOADED: dict[str, ModuleType | None] = {}


def _kernel_module(name: str) -> ModuleType | None:
    """``kernels.<name>`` if Triton imports, else None (cached)."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(f"kernels.{name}")
        except ImportError:
            _LOADED[name] = None
    return _LOADED[name]


def triton_runs(t: Tensor, module: ModuleType | None, kernel: str) -> bool:
    """Whether ``module.kernel`` (a Triton kernel) can run on ``t``'s device: CUDA, or CPU when the
    module was imported under Triton's interpreter."""
    if module is None or t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if t.is_cuda:
        return True
    if t.device.type != "cpu":
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - interpreter moved in a future Triton
        return False
    return isinstance(getattr(module, kernel), InterpretedFunction)


def _unit_cols(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _swiglu_act(g: Tensor, u: Tensor, scale: Tensor | None) -> Tensor:
    mod = _kernel_module("swiglu_act")
    if not triton_runs(g, mod, "_swiglu_act_fwd_kernel"):
        return reference.swiglu_act(g, u, scale)
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    mod.swiglu_act_fwd_into(_unit_cols(g), _unit_cols(u), scale, h)
    return h


def _swiglu_act_bwd_(g: Tensor, u: Tensor, a: Tensor, scale: Tensor | None) -> Tensor:
    mod = _kernel_module("swiglu_act")
    if not triton_runs(g, mod, "_swiglu_act_bwd_kernel") or g.stride(-1) != 1 or u.stride(-1) != 1:
        dg, du, ds = reference.swiglu_act_bwd(g, u, a, scale)
        g.copy_(dg)
        u.copy_(du)
        return ds if ds is not None else g.new_empty(0, dtype=torch.float32)
    ds = torch.empty(g.shape[0] if scale is not None else 0, dtype=torch.float32 if scale is None else scale.dtype, device=g.device)
    mod.swiglu_act_bwd_into(g, u, _unit_cols(a), scale, g, u, ds)
    return ds


def _unpermute(y: Tensor, y2: Tensor | None, pos: Tensor, K: int, scale: Tensor | None) -> Tensor:
    mod = _kernel_module("unpermute")
    if y.shape[0] == 0 or not triton_runs(y, mod, "_unpermute_kernel"):
        return reference.unpermute(y, y2, pos, K, scale)
    out = torch.empty(pos.shape[0] // K, y.shape[1], dtype=y.dtype, device=y.device)
    mod.unpermute_into(_unit_cols(y), None if y2 is None else _unit_cols(y2), pos, K, scale, out)
    return out


def _cross_entropy_rows(z: Tensor, y: Tensor, scale: float, grad_dtype: torch.dtype, want_grad: bool) -> tuple[Tensor, Tensor]:
    mod = _kernel_module("cross_entropy")
    if z.dtype != torch.float32 or not triton_runs(z, mod, "_cross_entropy_kernel"):
        loss, g = reference.cross_entropy_rows(z, y, scale, grad_dtype, want_grad)
        return loss, g if g is not None else z.new_empty(0, dtype=grad_dtype)
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    g = torch.empty(z.shape, dtype=grad_dtype, device=z.device) if want_grad else None
    mod.cross_entropy_rows_into(_unit_cols(z), y, scale, loss, g)
    return loss, g if g is not None else z.new_empty(0, dtype=grad_dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    mod = _kernel_module("rope")
    if x.shape[-1] % 2 or not triton_runs(x, mod, "_rope_kernel"):
        return reference.rope(x, cos, sin, inverse)
    y = torch.empty_like(x)
    mod.rope_into(_unit_cols(x), cos.contiguous(), sin.contiguous(), inverse, y)
    return y


QKV_DW_PROGRAMS = 512
"""Most programs per part of ``qkv_heads_bwd`` (rows of its weight-gradient partials): at 16,384 tokens each
walks 32 rows, and the partials (512 x 2,048 fp32 for olmoe's queries, 4 MB) cost ~2% of the kernel's bytes."""


def qkv_dw_programs(tokens: int) -> int:
    """Rows P of ``qkv_heads_bwd``'s weight-gradient partials for ``tokens`` token rows."""
    return max(1, min(tokens, QKV_DW_PROGRAMS))


def _qkv_widths(mode: str, H: int, G: int, d: int) -> tuple[int, int, int, int]:
    """(rstd columns of q, of k, dw width of q, of k) for a ``model.qk_norm`` mode."""
    return {"none": (0, 0, 0, 0), "full": (1, 1, H * d, G * d), "per_head": (H, G, d, d)}[mode]


def _qkv_heads(qkv: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos: Tensor, sin: Tensor, H: int, G: int, mode: str,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    mod = _kernel_module("qkv_heads")
    if not triton_runs(qkv, mod, "_qkv_heads_fwd_kernel"):
        return reference.qkv_heads(qkv, w_q, w_k, cos, sin, H, G, mode, eps)
    q, k, rstd = _fake_qkv_heads(qkv, w_q, w_k, cos, sin, H, G, mode, eps)
    mod.qkv_heads_fwd_into(_unit_cols(qkv), w_q, w_k, cos.contiguous(), sin.contiguous(), mode, eps, q, k, rstd)
    return q, k, rstd


def _fake_qkv_heads(qkv: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos: Tensor, sin: Tensor, H: int, G: int, mode: str,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, S, N = qkv.shape
    d = N // (H + 2 * G)
    nq, nk, _, _ = _qkv_widths(mode, H, G, d)
    return qkv.new_empty(B, S, H, d), qkv.new_empty(B, S, G, d), qkv.new_empty(B * S, nq + nk, dtype=torch.float32)


def _qkv_heads_bwd(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor | None, rstd: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos: Tensor,
                   sin: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    mod = _kernel_module("qkv_heads")
    if not triton_runs(dq, mod, "_qkv_heads_bwd_kernel"):
        return reference.qkv_heads_bwd(dq, dk, dv, qkv, rstd, w_q, w_k, cos, sin, mode, qkv_dw_programs(dq.shape[0] * dq.shape[1]))
    dqkv, dwq, dwk = _fake_qkv_heads_bwd(dq, dk, dv, qkv, rstd, w_q, w_k, cos, sin, mode)
    x = None if qkv is None else _unit_cols(qkv)
    mod.qkv_heads_bwd_into(_unit_cols(dq), _unit_cols(dk), _unit_cols(dv), x, rstd.contiguous(), w_q, w_k, cos.contiguous(), sin.contiguous(), mode,
                           dqkv, dwq, dwk)
    return dqkv, dwq, dwk


def _fake_qkv_heads_bwd(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor | None, rstd: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos: Tensor,
                        sin: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    B, S, H, d = dq.shape
    G = dk.shape[2]
    _, _, wq, wk = _qkv_widths(mode, H, G, d)
    P = qkv_dw_programs(B * S)
    return dq.new_empty(B, S, (H + 2 * G) * d), dq.new_empty(P, wq, dtype=torch.float32), dq.new_empty(P, wk, dtype=torch.float32)


def _rms_rows(t: Tensor, mod: ModuleType) -> tuple[Tensor, tuple[int, int, int, int, int]]:
    """``t`` with unit-stride columns and its row layout (``kernels.rms_norm.row_levels``), copied
    contiguous only when its rows need more than three strided levels."""
    t = _unit_cols(t)
    levels = mod.row_levels(t)
    if levels is None:
        t = t.contiguous()
        levels = mod.row_levels(t)
    return t, levels


RMS_NORM_DW_PROGRAMS = 264
"""Programs of the RMSNorm backward (two per SM of an H100 / H200), so rows of its ``dw`` partials."""


def rms_norm_dw_programs(rows: int) -> int:
    """Rows P of the RMSNorm backward's ``dw`` partials for ``rows`` normed rows (each program loops)."""
    return max(1, min(rows, RMS_NORM_DW_PROGRAMS))


def _as_partials(dw_D: Tensor, rows: int) -> Tensor:
    """A whole ``dw`` as the backward's [P, D] partials (row 0; the others 0), so every path has one shape."""
    out = dw_D.new_zeros(rms_norm_dw_programs(rows), dw_D.shape[0])
    out[0] = dw_D
    return out


def _rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    mod = _kernel_module("rms_norm")
    if x.shape[-1] == 0 or out_dtype not in (torch.bfloat16, torch.float16, torch.float32) or not triton_runs(x, mod, "_rms_norm_fwd_kernel"):
        return reference.rms_norm(x, weight, eps, out_dtype)
    x, levels = _rms_rows(x, mod)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mod.rms_norm_fwd_into(x, levels, weight.contiguous(), eps, y, rstd)
    return y, rstd


def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    mod = _kernel_module("rms_norm")
    if x.shape[-1] == 0 or not triton_runs(x, mod, "_rms_norm_bwd_kernel") or not triton_runs(dy, mod, "_rms_norm_bwd_kernel"):
        dx, dw = reference.rms_norm_backward(dy, x, weight, rstd)
        return dx, _as_partials(dw, rstd.numel())
    (x, lx), (dy, ldy) = _rms_rows(x, mod), _rms_rows(dy, mod)
    R, D = rstd.numel(), x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_part = torch.zeros(rms_norm_dw_programs(R), D, dtype=torch.float32, device=x.device)
    if R:
        mod.rms_norm_bwd_into(dy, ldy, x, lx, weight.contiguous(), rstd.contiguous(), dx, dw_part)
    return dx, dw_part


def _add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    mod = _kernel_module("rms_norm")
    if (x.shape != a.shape or x.shape[-1] == 0 or out_dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or not triton_runs(x, mod, "_rms_norm_fwd_kernel") or not triton_runs(a, mod, "_rms_norm_fwd_kernel")):
        return reference.add_rms_norm(x, a, weight, eps, out_dtype)
    x, levels = _rms_rows(x, mod)
    h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, a.dtype), device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mod.rms_norm_fwd_into(x, levels, weight.contiguous(), eps, y, rstd, a.contiguous(), h)
    return h, y, rstd


def _add_rms_norm_backward(dh: Tensor | None, dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, a_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    mod = _kernel_module("rms_norm")
    narrow = a_dtype != h.dtype
    if (h.shape[-1] == 0 or (dh is not None and dh.shape != h.shape) or a_dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or not all(triton_runs(t, mod, "_rms_norm_bwd_kernel") for t in (h, dy, h if dh is None else dh))):
        dx, da, dw = reference.add_rms_norm_backward(dh, dy, h, weight, rstd, a_dtype)
        return dx, da if narrow else dx.new_empty(0), _as_partials(dw, rstd.numel())
    (h, lh), (dy, ldy) = _rms_rows(h, mod), _rms_rows(dy, mod)
    R, D = rstd.numel(), h.shape[-1]
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    da = torch.empty(h.shape if narrow else (0,), dtype=a_dtype, device=h.device)
    dw_part = torch.zeros(rms_norm_dw_programs(R), D, dtype=torch.float32, device=h.device)
    if R:
        mod.rms_norm_bwd_into(dy, ldy, h, lh, weight.contiguous(), rstd.contiguous(), dx, dw_part, None if dh is None else dh.contiguous(),
                              da if narrow else None)
    return dx, da, dw_part


def _fake_add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, a.dtype))
    return h, x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _fake_add_rms_norm_backward(dh: Tensor | None, dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, a_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    da = h.new_empty(h.shape if a_dtype != h.dtype else (0,), dtype=a_dtype)
    return h.new_empty(h.shape), da, h.new_empty(rms_norm_dw_programs(rstd.numel()), h.shape[-1], dtype=torch.float32)


def _fake_rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _fake_rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(rms_norm_dw_programs(rstd.numel()), x.shape[-1], dtype=torch.float32)


def _adamw_(p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], step: list[Tensor], lr: float, beta1: float, beta2: float,
            eps: float, weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    mod = _kernel_module("adamw")
    fused, rest = [], []
    for i, t in enumerate(zip(p, g, m, v, step)):
        kernel_ready = (triton_runs(t[0], mod, "_adamw_kernel") and t[0].dtype == t[1].dtype == torch.float32 and t[2].dtype == t[3].dtype
                        and t[2].dtype in (torch.bfloat16, torch.float32) and all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in t[:4])
                        and t[0].shape == t[1].shape == t[2].shape == t[3].shape and t[4].dtype == torch.float32)
        (fused if kernel_ready else rest).append(i)
    for i in rest:
        reference.adamw_(p[i], g[i], m[i], v[i], step[i], lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
    for moments in (torch.bfloat16, torch.float32):  # one launch per moments dtype present (one in practice)
        idx = [i for i in fused if m[i].dtype == moments]
        if idx:
            table = mod.pointer_table(*([x[i] for i in idx] for x in (p, g, m, v, step)))
            mod.adamw_into(table, len(idx), max(p[i].numel() for i in idx), moments, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)


def _adamw_master_(p: list[Tensor], out: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], step: list[Tensor], lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    mod = _kernel_module("adamw")
    fused, rest = [], []
    for i, t in enumerate(zip(p, g, m, v, step, out)):
        kernel_ready = (triton_runs(t[0], mod, "_adamw_kernel") and t[0].dtype == torch.float32 and t[1].dtype == t[5].dtype == torch.bfloat16
                        and t[2].dtype == t[3].dtype and t[2].dtype in (torch.bfloat16, torch.float32)
                        and all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (*t[:4], t[5]))
                        and t[0].shape == t[1].shape == t[2].shape == t[3].shape == t[5].shape and t[4].dtype == torch.float32)
        (fused if kernel_ready else rest).append(i)
    for i in rest:
        reference.adamw_master_(p[i], out[i], g[i], m[i], v[i], step[i], lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
    for moments in (torch.bfloat16, torch.float32):  # one launch per moments dtype present (one in practice)
        idx = [i for i in fused if m[i].dtype == moments]
        if idx:
            table = mod.pointer_table(*([x[i] for i in idx] for x in (p, g, m, v, step)), out=[out[i] for i in idx])
            mod.adamw_into(table, len(idx), max(p[i].numel() for i in idx), moments, lr, beta1, beta2, eps, weight_decay, grad_scale,
                           found_inf, master=True)


def _fake_adamw_master_(p: list[Tensor], out: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], step: list[Tensor], lr: float,
                        beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    return None


def _fake_adamw_(p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor], step: list[Tensor], lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    return None


def _plan_indices(order: Tensor, weights: Tensor, K: int, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    mod = _kernel_module("plan_indices")
    if not triton_runs(weights, mod, "_plan_indices_kernel") or order.dtype != torch.int64:
        return reference.plan_indices(order, weights, K, num_rows)
    A = order.shape[0]
    row = torch.empty(A, dtype=torch.int32, device=order.device)
    token, weight = torch.empty(num_rows, dtype=torch.int64, device=order.device), weights.new_empty(num_rows)
    mod.plan_indices_into(order.contiguous(), weights.contiguous(), K, num_rows, row, token, weight)
    return row, token, weight


def _fake_plan_indices(order: Tensor, weights: Tensor, K: int, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    return order.new_empty(order.shape[0], dtype=torch.int32), order.new_empty(num_rows), weights.new_empty(num_rows)


def _cast_many(xs: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    mod = _kernel_module("cast_many")
    same = all(x.dtype == xs[0].dtype and x.device == xs[0].device for x in xs) if xs else False
    pair = {xs[0].dtype, dtype} == {torch.float32, torch.bfloat16} if xs else False
    if not same or not pair or len(xs) > 3 or not triton_runs(xs[0], mod, "_cast_many_kernel"):
        return reference.cast_many(list(xs), dtype)
    sources = [x.contiguous() for x in xs]
    outputs = [torch.empty(x.shape, dtype=dtype, device=x.device) for x in sources]
    mod.cast_many_into(sources, outputs)
    return outputs


def _fake_cast_many(xs: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [x.new_empty(x.shape, dtype=dtype) for x in xs]


def _topk_gates_bwd(probs: Tensor, weights: Tensor, ids: Tensor, dweights: Tensor | None, sums: Tensor | None, dprobs: Tensor | None,
                    f: Tensor | None, daux: Tensor | None, lse: Tensor | None, dz: Tensor | None, aux_scale: float, z_scale: float) -> Tensor:
    mod = _kernel_module("topk_gates")
    if not triton_runs(probs, mod, "_topk_gates_bwd_kernel"):
        return reference.topk_gates_bwd(probs, weights, ids, dweights, sums, dprobs, f, daux, lse, dz, aux_scale, z_scale)
    out = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    mod.topk_gates_bwd_into(c(probs), c(weights), c(ids), c(dweights), c(sums), c(dprobs), c(f), c(daux), c(lse), c(dz), aux_scale, z_scale, out)
    return out


def _fake_topk_gates_bwd(probs: Tensor, weights: Tensor, ids: Tensor, dweights: Tensor | None, sums: Tensor | None, dprobs: Tensor | None,
                         f: Tensor | None, daux: Tensor | None, lse: Tensor | None, dz: Tensor | None, aux_scale: float, z_scale: float) -> Tensor:
    return probs.new_empty(probs.shape, dtype=torch.float32)


def _fake_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    return torch.empty_like(x)


def _fake_swiglu_act(g: Tensor, u: Tensor, scale: Tensor | None) -> Tensor:
    return g.new_empty(g.shape)


def _fake_swiglu_act_bwd_(g: Tensor, u: Tensor, a: Tensor, scale: Tensor | None) -> Tensor:
    return g.new_empty(g.shape[0], dtype=scale.dtype) if scale is not None else g.new_empty(0, dtype=torch.float32)


def _fake_unpermute(y: Tensor, y2: Tensor | None, pos: Tensor, K: int, scale: Tensor | None) -> Tensor:
    return y.new_empty(pos.shape[0] // K, y.shape[1])


def _fake_cross_entropy_rows(z: Tensor, y: Tensor, scale: float, grad_dtype: torch.dtype, want_grad: bool) -> tuple[Tensor, Tensor]:
    return z.new_empty(z.shape[0], dtype=torch.float32), z.new_empty(z.shape if want_grad else (0,), dtype=grad_dtype)


# Registered with the low-level ``torch.library.Library`` API: a call costs the C++ dispatcher plus
# one Python function (~3 us), where ``torch.library.custom_op``'s wrapper cost ~30 us a call,
# which a layer step on a fast GPU pays as idle time between kernels.
_LIB = torch.library.Library("moeforge", "DEF")
_OPS = {
    "swiglu_act": ("swiglu_act(Tensor g, Tensor u, Tensor? scale) -> Tensor", _swiglu_act, _fake_swiglu_act),
    "swiglu_act_bwd_": ("swiglu_act_bwd_(Tensor(a!) g, Tensor(b!) u, Tensor a, Tensor? scale) -> Tensor", _swiglu_act_bwd_, _fake_swiglu_act_bwd_),
    "unpermute": ("unpermute(Tensor y, Tensor? y2, Tensor pos, SymInt K, Tensor? scale) -> Tensor", _unpermute, _fake_unpermute),
    "cross_entropy_rows": ("cross_entropy_rows(Tensor z, Tensor y, float scale, ScalarType grad_dtype, bool want_grad) -> (Tensor, Tensor)",
                           _cross_entropy_rows, _fake_cross_entropy_rows),
    "rope": ("rope(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor", _rope, _fake_rope),
    "plan_indices": ("plan_indices(Tensor order, Tensor weights, SymInt K, SymInt num_rows) -> (Tensor, Tensor, Tensor)",
                     _plan_indices, _fake_plan_indices),
    "cast_many": ("cast_many(Tensor[] xs, ScalarType dtype) -> Tensor[]", _cast_many, _fake_cast_many),
    "topk_gates_bwd": ("topk_gates_bwd(Tensor probs, Tensor weights, Tensor ids, Tensor? dweights, Tensor? sums, Tensor? dprobs, "
                       "Tensor? f, Tensor? daux, Tensor? lse, Tensor? dz, float aux_scale, float z_scale) -> Tensor",
                       _topk_gates_bwd, _fake_topk_gates_bwd),
    "qkv_heads": ("qkv_heads(Tensor qkv, Tensor? w_q, Tensor? w_k, Tensor cos, Tensor sin, SymInt H, SymInt G, str mode, float eps) "
                  "-> (Tensor, Tensor, Tensor)", _qkv_heads, _fake_qkv_heads),
    "qkv_heads_bwd": ("qkv_heads_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor? qkv, Tensor rstd, Tensor? w_q, Tensor? w_k, Tensor cos, "
                      "Tensor sin, str mode) -> (Tensor, Tensor, Tensor)", _qkv_heads_bwd, _fake_qkv_heads_bwd),
    "rms_norm": ("rms_norm(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor, Tensor)", _rms_norm, _fake_rms_norm),
    "rms_norm_backward": ("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
                          _rms_norm_backward, _fake_rms_norm_backward),
    "add_rms_norm": ("add_rms_norm(Tensor x, Tensor a, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)",
                     _add_rms_norm, _fake_add_rms_norm),
    "add_rms_norm_backward": ("add_rms_norm_backward(Tensor? dh, Tensor dy, Tensor h, Tensor weight, Tensor rstd, ScalarType a_dtype) "
                              "-> (Tensor, Tensor, Tensor)", _add_rms_norm_backward, _fake_add_rms_norm_backward),
    "adamw_": ("adamw_(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] m, Tensor(c!)[] v, Tensor[] step, float lr, float beta1, float beta2, float eps, "
               "float weight_decay, Tensor? grad_scale, Tensor? found_inf) -> ()", _adamw_, _fake_adamw_),
    "adamw_master_": ("adamw_master_(Tensor(a!)[] p, Tensor(d!)[] out, Tensor[] g, Tensor(b!)[] m, Tensor(c!)[] v, Tensor[] step, float lr, "
                      "float beta1, float beta2, float eps, float weight_decay, Tensor? grad_scale, Tensor? found_inf) -> ()",
                      _adamw_master_, _fake_adamw_master_),
}
for _name, (_schema, _impl, _fake) in _OPS.items():
    _LIB.define(_schema)
    for _key in ("CPU", "CUDA"):
        _LIB.impl(_name, _impl, _key)
    torch.library.register_fake(f"moeforge::{_name}", _fake, lib=_LIB)

swiglu_act = torch.ops.moeforge.swiglu_act.default
"""``h = scale[:, None] * silu(g) * u`` (fp32 math, g's dtype); ``scale`` may be None."""
swiglu_act_bwd_ = torch.ops.moeforge.swiglu_act_bwd_.default
"""Gradients of ``swiglu_act`` for the output gradient ``a``, in place: ``g`` becomes ``dg`` and
``u`` becomes ``du`` (each element is read before it is overwritten, by the same program), so the
backward needs no new R x F buffers. Returns ``dscale`` (empty when ``scale`` is None)."""
unpermute = torch.ops.moeforge.unpermute.default
"""``out[t] = sum_j scale[p] * (y[p] + y2[p])`` over ``p = pos[t*K + j] >= 0`` (fp32 sum, y's dtype)."""
cross_entropy_rows = torch.ops.moeforge.cross_entropy_rows.default
"""``(loss_C, g_CV)`` of fp32 logits ``z_CV`` and targets ``y_C``: ``loss_c = lse(z_c) - z_{c y_c}``
(fp32) and ``g_c = (softmax(z_c) - onehot(y_c)) * scale`` in ``grad_dtype`` (empty unless
``want_grad``). One kernel reads the logits and writes the gradient once (``kernels.cross_entropy``)."""
rope = torch.ops.moeforge.rope.default
"""``x [B, H, S, d]`` rotated pairwise (first half, second half) by each position's angle
(``cos``/``sin`` [S, d/2]), or by its negative when ``inverse`` (the backward); fp32 math, x's
dtype and dimension order (``empty_like``). One kernel reads each element once and writes it once (``kernels.rope``)."""
rms_norm = torch.ops.moeforge.rms_norm.default
"""``(y, rstd)`` of rows ``x [..., D]``: ``rstd = 1 / sqrt(mean(x^2) + eps)`` (fp32, ``x.shape[:-1]``) and
``y = x rstd w`` (fp32 math, written contiguous in ``out_dtype``) (Zhang & Sennrich 2019, eq. 4).
One kernel reads ``x`` once in its own dtype, strided rows in place (``kernels.rms_norm``)."""
rms_norm_backward = torch.ops.moeforge.rms_norm_backward.default
"""``(dx, dw_parts)`` of ``rms_norm`` for the output gradient ``dy``: ``dx = rstd (g - xh mean(g xh))``
with ``xh = x rstd``, ``g = dy w`` (x's dtype, contiguous), and ``dw = sum over rows of dy xh`` as
fp32 per-program partial sums ``[P, D]`` (P = ``rms_norm_dw_programs(rows)``), which the caller sums
over dim 0 (one small second launch, counted as such). One kernel."""
add_rms_norm = torch.ops.moeforge.add_rms_norm.default
"""``(h, y, rstd)``: the residual sum ``h = x + a`` (``promote_types(x, a)``, contiguous) and
``rms_norm(h)``'s ``(y, rstd)``, from one kernel that reads ``x`` and ``a`` once and writes ``h`` and ``y``
once, where the eager add then norm read ``h`` again. ``x`` and ``a`` have the same shape."""
add_rms_norm_backward = torch.ops.moeforge.add_rms_norm_backward.default
"""``(dx, da, dw)`` of ``add_rms_norm`` for the gradients ``dh`` (of ``h``, from the rest of the
residual stream; None where ``h`` is used no further, as after the last block) and ``dy``: ``dx = dh + rms_norm_backward(dy, h)``'s dx in h's dtype; ``da`` the same
values in ``a_dtype`` when that is narrower than h's (else empty: ``da`` is ``dx``); ``dw`` as
``rms_norm_backward``'s [P, D] partials. One kernel, where the eager path runs the norm's backward, an
add of the two gradients and a downcast."""
qkv_heads = torch.ops.moeforge.qkv_heads.default
"""``(q [B, S, H, d], k [B, S, G, d], rstd [T, nq + nk])`` of attention's fused projection ``qkv [B, S, (H + 2G) d]``:
queries and keys RMS-normalised (``mode`` = ``model.qk_norm``: full, per_head or none; weights ``w_q``/``w_k``, eps
``eps``) and rotated by RoPE (``cos``/``sin`` [S, d/2]); fp32 math, qkv's dtype, contiguous (so ``transpose(1, 2)``
gives SDPA's heads); ``rstd`` fp32 for the backward. The values stay a view of ``qkv``. One kernel
(``kernels.qkv_heads``)."""
qkv_heads_bwd = torch.ops.moeforge.qkv_heads_bwd.default
"""``(dqkv [B, S, N], dw_q partials [P, width], dw_k partials)`` of ``qkv_heads`` and the value view for the head
gradients ``dq``, ``dk``, ``dv`` (any strides, unit-stride rows): one kernel writes ``dqkv`` whole (no ``cat``); the
weight gradients are the sums over the P = ``qkv_dw_programs(T)`` rows (empty [P, 0] for mode none, where ``qkv``,
which only the norms' backward reads, may be None)."""
plan_indices = torch.ops.moeforge.plan_indices.default
"""``(row_of_slot_A int32, token_idx_R int64, weight_R)`` of ``order`` (a permutation of the A slots, the R = ``num_rows``
kept ones first): ``row_of_slot[order[i]] = i`` (-1 from ``num_rows`` on), ``token_idx[i] = order[i] // K`` and
``weight[i] = weights[order[i]]`` for ``i < num_rows``. One kernel (``kernels.plan_indices``)."""
cast_many = torch.ops.moeforge.cast_many.default
"""``[x.to(dtype) for x in xs]`` as fresh contiguous tensors (round to nearest even): 1 to 3 tensors of one
device, fp32 to bf16 or back, in one kernel launch (``kernels.cast_many``); otherwise one cast each."""
topk_gates_bwd = torch.ops.moeforge.topk_gates_bwd.default
"""fp32 ``dlogits [T, E]`` of the top-k router from the gradients of its gates ``dweights`` (renormalised by
``sums`` when given), of its probabilities ``dprobs``, of its balance loss ``daux`` (with ``f`` and
``aux_scale = c_a E / T``) and of its z-loss ``dz`` (with ``lse`` and ``z_scale = 2 c_z / T``); absent ones None.
One kernel reads the probabilities once and writes the gradient once (``kernels.topk_gates``)."""
adamw_ = torch.ops.moeforge.adamw_.default
"""One AdamW step of every parameter ``p[i]`` (fp32) with gradient ``g[i]`` in place: ``p[i]`` and the moments
``m[i]``, ``v[i]`` (bf16 or fp32, stored rounded to nearest even), fp32 math; ``step[i]`` is its count after this
step (0-dim device tensor), gradients are divided by ``grad_scale`` and nothing is written where ``found_inf`` is
nonzero. One kernel for all the tensors reads each p, g, m, v once and writes p, m, v once (``kernels.adamw``;
its small address table is copied to the device first)."""
adamw_master_ = torch.ops.moeforge.adamw_master_.default
"""``adamw_`` of fp32 masters ``p[i]`` with bf16 gradients ``g[i]``, also writing each updated master rounded to nearest
even into the model's bf16 parameter ``out[i]`` (nothing where ``found_inf`` is nonzero). One kernel reads p, g, m, v
once and writes p, m, v and out once (``kernels.adamw``, ``master=True``; ``launch.kernel_adamw`` with ``optim.master_weights``)."""
