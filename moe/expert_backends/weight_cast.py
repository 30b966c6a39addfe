"""The experts' compute-dtype copies of their weights, in fewer launches than one cast per weight.

Shape letters: the ``moe`` package legend (D model dim, F expert ffn dim, E experts).

Under mixed precision the stacked expert weights are fp32 masters and the grouped GEMMs run in
the autocast dtype, so every forward makes a bf16 copy of ``w_gate_EDF``, ``w_up_EDF`` and
``w_down_EFD`` and every backward turns their bf16 gradients back into fp32. Autograd's
``Tensor.to`` does that as three casts forward and three backward, six kernel launches per layer
step. ``cast_weights`` moves the same elements with the same rounding (each element converted
alone, round-to-nearest-even, as ``Tensor.to``) through one ``torch._foreach_copy_`` each way: on
CUDA a multi-tensor-apply kernel, which converts between dtypes when the sources share one dtype
and the destinations another (``foreach_tensor_copy_list_kernel_cuda_``,
aten/src/ATen/native/cuda/ForeachBinaryOpList.cu). Multi-tensor apply launches once per 320
chunks of 65,536 elements (``kChunkSize`` and ``depth_to_max_blocks`` in
aten/src/ATen/native/cuda/MultiTensorApply.cuh), so weights of more than about 21M elements in
all take several launches; where that is no fewer than one per weight, the per-tensor casts are
kept (their launch cost is then small beside their bytes). ``cast_weights_reference`` is the
per-tensor ``Tensor.to`` it replaces; tests compare the two, values and gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_CHUNK, _CHUNKS_PER_LAUNCH, _TENSORS_PER_LAUNCH = 65536, 320, 64
"""Multi-tensor apply's chunk size, chunks per launch and tensors per launch at list depth 2 (MultiTensorApply.cuh)."""


def cast_weights_reference(weights: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``tuple(w.to(dtype) for w in weights)``: the obviously-correct twin of ``cast_weights``."""
    return tuple(w.to(dtype) for w in weights)


def foreach_copy_launches(weights: tuple[Tensor, ...]) -> int:
    """Kernel launches of one CUDA ``torch._foreach_copy_`` over ``weights`` (module docstring)."""
    chunks = sum(math.ceil(w.numel() / _CHUNK) for w in weights)
    return max(1, math.ceil(chunks / _CHUNKS_PER_LAUNCH), math.ceil(len(weights) / _TENSORS_PER_LAUNCH))


def cast_weights(weights: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Each of ``weights`` in ``dtype`` (the same tensor where it already is), differentiable,
    converted by one multi-tensor copy forward and one backward (module docstring).

    Falls back to ``cast_weights_reference`` where one copy cannot do it all (weights of
    different dtypes or devices, tensor subclasses such as FSDP's DTensors) or would launch no
    fewer kernels than the per-tensor casts (large weights)."""
    if all(w.dtype == dtype for w in weights):
        return tuple(weights)
    plain = all(type(w) in (Tensor, torch.nn.Parameter) for w in weights)
    if not plain or len({(w.dtype, w.device) for w in weights}) != 1 or foreach_copy_launches(weights) >= len(weights):
        return cast_weights_reference(weights, dtype)
    return _CastWeights.apply(dtype, *weights)


def _copy_all(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Fresh copies of ``tensors`` in ``dtype`` (same shapes and strides), in one ``_foreach_copy_``."""
    out = [torch.empty_like(t, dtype=dtype) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


class _CastWeights(torch.autograd.Function):
    """Forward: the weights in ``dtype``; backward: their gradients back in the weights' dtype."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.source_dtype = weights[0].dtype
        ctx.set_materialize_grads(False)
        return tuple(_copy_all(list(weights), dtype))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        present = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + i]]
        copies = _copy_all([grads[i] for i in present], ctx.source_dtype) if present else []
        out: list[Tensor | None] = [None] * len(grads)
        for i, c in zip(present, copies):
            out[i] = c
        return (None, *out)
