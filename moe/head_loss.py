"""Output head and cross-entropy together, chunked over tokens: the loss without full fp32 logits.

Shape letters: the ``moe`` package legend (T tokens, D model dim, V vocabulary, C tokens in one chunk).

The plain loss (``head_cross_entropy_reference``) writes the logits ``[T, V]``, upcasts all of
them to fp32, and keeps them (and writes their gradient) for the backward: at V = 50,304 and
T = 16,384 that is 3.3 GB of fp32 logits plus as much again for their gradient. Here the tokens
are cut into chunks of ``C`` rows and, for each chunk, the forward computes the logits, the
log-sum-exp, the loss and, in training, already the gradients ``dx`` and ``dW`` (the gradient of
cross-entropy with respect to the logits is ``softmax(z) - onehot(y)``, scaled by 1/T for the
mean), so no chunk's logits outlive its iteration. The backward only scales the stored ``dx`` and
``dW`` by the incoming gradient, which is a scalar because the loss is the last op of the graph.
This is the same trade as Liger Kernel's fused linear cross-entropy (Hsu et al. 2024, "Liger
Kernel: Efficient Triton Kernels for LLM Training", sec. 3.3), written with torch ops: the head's
three GEMMs run once each, nothing is recomputed.

Precision follows the plain path exactly: under autocast the head GEMMs run in the autocast dtype
(the weight and input cast once), the logits are upcast to fp32 for the log-softmax, and the
logit gradient is cast back to the autocast dtype for ``dx`` and ``dW``; ``dW`` is summed over
chunks in fp32. In fp32 the loss and gradients equal the reference's to rounding (tests: 1e-6).

On a GPU with 16-bit operands, the GEMMs whose results are wanted in fp32 write fp32 directly
(``torch.mm(..., out_dtype=float32)``, as the router gate does): products of 16-bit values are
exact in fp32, so this is the fp32 GEMM of the same operands up to summation order, and it skips
writing a 16-bit result and upcasting it. That covers the logits, ``dx`` (when the residual stream
is fp32) and ``dW``, which every chunk accumulates inside its GEMM (``addmm`` with ``beta = 1``
into the fp32 sum, ``aten::addmm.dtype_out``; the first chunk overwrites) instead of writing its
own ``[V, D]`` and adding it (a read, a read and a write of 4 V D bytes per chunk: 16 GB per step
at V = 50,304, D = 2,048, T = 16,384). Between the GEMMs one kernel per chunk
(``kernels.cross_entropy`` through ``kernels.ops.cross_entropy_rows``) reads the fp32 logits and
writes each row's loss and the logit gradient already in the GEMMs' dtype, where torch needs
seven kernels and an fp32 gradient. Results are at least as accurate as the plain path's, not
bit-equal to them. The CPU keeps the torch ops, unchanged (``kernels.reference.cross_entropy_rows``
in place; torch has no CPU kernel for ``mm`` with ``out_dtype``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import ops, reference
from moe.autocast import autocast_dtype, gpu_path_device, takes_gpu_path

REDUCTIONS = ("mean", "sum")

CHUNK_BYTES = 256 * 2**20
"""Target size of one chunk's fp32 logits; C = max(1, CHUNK_BYTES // (4 V)) tokens (1,334 at V = 50,304).

512 MiB would save about 100 launches and 7 GB of ``dW`` traffic per olmoe_1b_7b step
(``tools.bench.step_budget``: 27.3% instead of 26.7% predicted MFU on an H200) but adds 0.5 GB to the
loss peak, which is what keeps ``mixtral_8x7b`` under 80 GB per GPU on 64 H100s."""


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


_HALF = (torch.bfloat16, torch.float16)


def _fp32_out(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the GEMMs write fp32 from 16-bit operands (GPU; ``meta`` stands for it in the budget)."""
    return dtype in _HALF and gpu_path_device(device)


def _mm_fp32(a: Tensor, b: Tensor, direct: bool) -> Tensor:
    """``a @ b`` as fp32: written directly by the GEMM when ``direct``, else cast after."""
    return torch.mm(a, b, out_dtype=torch.float32) if direct else (a @ b).float()


def _compute_dtype(x_TD: Tensor) -> torch.dtype:
    """The dtype the plain path's head GEMM runs in: autocast's when it is on, else the input's."""
    dev = x_TD.device.type
    if dev not in ("cuda", "cpu"):  # meta (the step budget): moe.autocast answers for it
        return autocast_dtype(x_TD) or x_TD.dtype
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_TD.dtype


def _chunk_on_cpu(xc_CD: Tensor, yc_C: Tensor, w_VD: Tensor, scale: float, dtype: torch.dtype, want_grad: bool,
                  dx_CD: Tensor | None, dw_VD: Tensor | None, first: bool) -> Tensor:
    """One chunk with torch ops: its summed loss; ``dx_CD`` written, ``dw_VD`` added to (the logit
    gradient reuses the logits' storage)."""
    z_CV = _mm_fp32(xc_CD, w_VD.t(), False)
    loss_C, g_CV = reference.cross_entropy_rows(z_CV, yc_C, scale, dtype, want_grad, inplace=True)
    if g_CV is not None:
        if dx_CD is not None:
            dx_CD[...] = g_CV @ w_VD
        if dw_VD is not None:
            dw_VD += _mm_fp32(g_CV.t(), xc_CD, False)
    return loss_C.sum()


def _chunk_on_card(xc_CD: Tensor, yc_C: Tensor, w_VD: Tensor, scale: float, dtype: torch.dtype, want_grad: bool,
                   dx_CD: Tensor | None, dw_VD: Tensor | None, first: bool) -> Tensor:
    """One chunk on a GPU (``meta`` in the budget): the logits GEMM, one cross-entropy kernel
    (``kernels.ops.cross_entropy_rows``: per-row loss, logit gradient in ``dtype``), then ``dx``
    written by its GEMM and ``dW`` accumulated inside its GEMM (``beta = 1``; the first chunk
    overwrites). Returns the chunk's per-row losses."""
    direct = _fp32_out(dtype, xc_CD.device)
    z_CV = _mm_fp32(xc_CD, w_VD.t(), direct)
    loss_C, g_CV = ops.cross_entropy_rows(z_CV, yc_C, scale, dtype, want_grad)
    del z_CV
    if not want_grad:
        return loss_C
    if dx_CD is not None:
        _mm_into(g_CV, w_VD, dx_CD, accumulate=False)
    if dw_VD is not None:
        _mm_into(g_CV.t(), xc_CD, dw_VD, accumulate=not first)
    return loss_C


_ADDMM_FP32_SELF = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 10)
"""Whether ``addmm(..., out_dtype=float32)`` takes an fp32 ``self`` beside 16-bit operands on CUDA
(pytorch/pytorch#167931, in torch 2.10; before, ``self`` had to share the operands' dtype)."""


def _mm_into(a: Tensor, b: Tensor, out: Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (or ``out += a @ b``) written by the GEMM itself, fp32 ``out`` from 16-bit
    operands included (``aten::mm.dtype_out`` / ``addmm.dtype_out``); other dtype pairs are cast after."""
    if out.dtype == a.dtype:
        torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and a.dtype in _HALF:
        if not accumulate:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        elif _ADDMM_FP32_SELF:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            out += torch.mm(a, b, out_dtype=torch.float32)
    elif accumulate:
        out += a @ b
    else:
        out.copy_(a @ b)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and (when gradients are wanted) ``dx``, ``dW`` chunk by chunk."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, dtype: torch.dtype, chunk: int, mean: bool) -> Tensor:  # type: ignore[override]
        T = x_TD.shape[0]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        scale = 1.0 / T if mean else 1.0
        card = takes_gpu_path(x_TD) and T > 0
        run = _chunk_on_card if card else _chunk_on_cpu
        with torch.autocast(x_TD.device.type if x_TD.device.type in ("cuda", "cpu") else "cpu", enabled=False):
            w_VD = weight_VD.to(dtype)
            dx_TD = torch.empty_like(x_TD) if ctx.needs_input_grad[0] else None
            dw_VD = None
            if ctx.needs_input_grad[1]:  # on a card the first chunk's GEMM overwrites it
                dw_VD = (torch.empty if card else torch.zeros)(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
            parts = []
            for start in range(0, T, chunk):
                rows = slice(start, start + chunk)
                parts.append(run(x_TD[rows].to(dtype), targets_T[rows], w_VD, scale, dtype, want_grad,
                                 None if dx_TD is None else dx_TD[rows], dw_VD, start == 0))
            loss = torch.cat(parts).sum() if card else torch.zeros((), dtype=torch.float32, device=x_TD.device)
            if not card:
                for part in parts:
                    loss += part
        ctx.save_for_backward(dx_TD, dw_VD)
        ctx.weight_dtype = weight_VD.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dx_TD, dw_VD = ctx.saved_tensors
        dx = dx_TD * grad_out.to(dx_TD.dtype) if dx_TD is not None else None
        dw = (dw_VD * grad_out).to(ctx.weight_dtype) if dw_VD is not None else None
        return dx, dw, None, None, None, None


def head_cross_entropy(x_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, reduction: str = "mean", chunk: int | None = None) -> Tensor:
    """Cross-entropy of ``x_TD @ weight_VD.T`` against ``targets_T``, chunked over tokens (fp32 scalar).

    ``reduction``: ``mean`` over tokens or ``sum``. ``chunk``: tokens per chunk (default from
    ``CHUNK_BYTES``). Equal to ``head_cross_entropy_reference`` in value and gradients.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: must be one of {list(REDUCTIONS)}")
    c = chunk or chunk_tokens(weight_VD.shape[0])
    return _ChunkedHeadCrossEntropy.apply(x_TD, weight_VD, targets_T, _compute_dtype(x_TD), c, reduction == "mean")


def head_cross_entropy_reference(x_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, reduction: str = "mean") -> Tensor:
    """The plain path: full logits, upcast to fp32, ``torch.nn.functional.cross_entropy``."""
    logits_TV = x_TD @ weight_VD.t()
    return torch.nn.functional.cross_entropy(logits_TV.float(), targets_T, reduction=reduction)
