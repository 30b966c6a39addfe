"""The experts' compute-dtype copies of their weights, in one launch each way instead of three.

Shape letters: the ``moe`` package legend (D model dim, F expert ffn dim, E experts).

Under mixed precision the stacked expert weights are fp32 masters and the grouped GEMMs run in
the autocast dtype, so every forward makes a bf16 copy of ``w_gate_EDF``, ``w_up_EDF`` and
``w_down_EFD`` and every backward turns their bf16 gradients back into fp32. Autograd's
``Tensor.to`` does that as three casts forward and three backward, six kernel launches per layer
step. ``cast_weights`` moves the same elements with the same rounding (each element converted
alone, round to nearest even, as ``Tensor.to``) through ``moeforge::cast_many`` (``kernels.cast_many``),
one launch forward and one backward on a GPU; the bytes are those of the three casts.
``cast_weights_reference`` is the per-tensor ``Tensor.to`` it replaces; tests compare the two,
values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import ops


def cast_weights_reference(weights: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``tuple(w.to(dtype) for w in weights)``: the obviously-correct twin of ``cast_weights``."""
    return tuple(w.to(dtype) for w in weights)


def cast_weights(weights: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Each of ``weights`` in ``dtype`` (the same tensor where it already is), differentiable,
    converted in one launch forward and one backward (module docstring).

    Falls back to ``cast_weights_reference`` where one launch cannot do it all: more than three
    weights, weights of different dtypes or devices, or tensor subclasses such as FSDP's DTensors."""
    if all(w.dtype == dtype for w in weights):
        return tuple(weights)
    plain = all(type(w) in (Tensor, torch.nn.Parameter) for w in weights)
    if not plain or not 1 <= len(weights) <= 3 or len({(w.dtype, w.device) for w in weights}) != 1:
        return cast_weights_reference(weights, dtype)
    return _CastWeights.apply(dtype, *weights)


class _CastWeights(torch.autograd.Function):
    """Forward: the weights in ``dtype``; backward: their gradients back in the weights' dtype."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.source_dtype = weights[0].dtype
        ctx.set_materialize_grads(False)
        return tuple(ops.cast_many(list(weights), dtype))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        present = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[1 + i]]
        present = [i for i in present if grads[i].dtype == grads[present[0]].dtype]  # one dtype per launch (always, in practice)
        copies = ops.cast_many([grads[i] for i in present], ctx.source_dtype) if present else []
        out: list[Tensor | None] = [None] * len(grads)
        for i, c in zip(present, copies):
            out[i] = c
        for i, g in enumerate(grads):
            if out[i] is None and g is not None and ctx.needs_input_grad[1 + i]:
                out[i] = g.to(ctx.source_dtype)
        return (None, *out)
