"""The linear gate of a router: its init (``normal_gate``) and its logits in fp32 without an fp32 GEMM,
``h_TE = x_TD W_ED^T (+ b_E)`` (``gate_logits``).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts,
R similarity rank (``normal_gate`` also builds the similarity router's projections, ``W_RD``).

Routers compute in fp32 (softmax, top-k and the auxiliary losses are sensitive to rounding), but
the gate GEMM itself need not run on fp32 SIMT units: when ``x`` is bf16/fp16 on a GPU, the
products of 16-bit values are exact in fp32, so a tensor-core GEMM that accumulates and writes
fp32 (``torch.mm(..., out_dtype=torch.float32)``) gives the fp32 GEMM of those values up to
summation order, at tensor-core speed (the fp32 SIMT GEMMs it replaces took 1.1 ms of a 28 ms
layer step at T=32768, D=2048, E=128 on an H200). The weight is cast to x's dtype for the
product, as autocast would. Elsewhere (CPU, fp32 activations) it is the plain fp32 GEMM, with
autocast off so it stays fp32. ``meta`` tensors take the GPU path (the layer budget counts it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe.autocast import autocast_dtype, takes_gpu_path

_HALF = (torch.bfloat16, torch.float16)


def normal_gate(d_model: int, width: int) -> nn.Linear:
    """A bias-free ``nn.Linear(d_model, width)`` drawn from ``N(0, 1/D)``: a gate ``W_ED`` (width E), or ``W_RD``.

    Each logit of a unit-variance input then starts with unit variance, whatever D. The
    ``nn.Linear``'s own default init draws from the global generator first and is then overwritten;
    skipping that draw would change every later draw of a seeded run.
    """
    gate = nn.Linear(d_model, width, bias=False)
    nn.init.normal_(gate.weight, std=d_model**-0.5)
    return gate


def _mm_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(a, b, out_dtype=torch.float32)


class _HalfGate(torch.autograd.Function):
    """``x W^T`` with 16-bit operands and fp32 accumulation/output; gradients through 16-bit GEMMs."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_ED: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_TD, w_ED)
        return _mm_fp32_out(x_TD, w_ED.t())

    @staticmethod
    def backward(ctx, g_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x_TD, w_ED = ctx.saved_tensors
        g_TE = g_TE.to(x_TD.dtype)
        dx = torch.mm(g_TE, w_ED) if ctx.needs_input_grad[0] else None
        dw = _mm_fp32_out(g_TE.t(), x_TD).to(w_ED.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def _half_gemm_ok(x_TD: Tensor) -> bool:
    return x_TD.dtype in _HALF and takes_gpu_path(x_TD) and hasattr(torch.ops.aten.mm, "dtype")


def gate_logits(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None = None) -> Tensor:
    """fp32 ``x W^T + b`` (module docstring): a 16-bit tensor-core GEMM on GPUs, fp32 elsewhere.
    Under CUDA autocast, x is first cast to the autocast dtype (as autocast does for a linear)."""
    dtype = autocast_dtype(x_TD)
    if dtype is not None:
        x_TD = x_TD.to(dtype)
    if _half_gemm_ok(x_TD):
        h_TE = _HalfGate.apply(x_TD, weight_ED.to(x_TD.dtype))
        return h_TE if bias_E is None else h_TE + bias_E.float()
    device_type = x_TD.device.type if x_TD.device.type in ("cuda", "cpu") else "cpu"
    with torch.autocast(device_type, enabled=False):
        return nn.functional.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())
