"""Activation checkpointing of transformer blocks: full, or selective (keep GEMM and attention outputs).

A checkpointed block keeps only its input during the forward and runs its forward again in the
backward to rebuild what the backward needs (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"). ``full`` recomputes the whole block; ``selective`` saves the outputs of the matrix
products and of attention (the costly ops) and recomputes only the cheap elementwise ones (norms,
RoPE, SwiGLU, softmax, dispatch), the trade Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", sec. 4.2) argue for: most of the memory for a few
percent of the FLOPs.

A forward that runs again must not count twice: routing statistics, routing probes and routers'
per-step load counts are side effects of an MoE layer's forward. ``is_recomputing()`` is true
while a checkpointed forward runs again; the code that records side effects skips them then, so a
checkpointed step records exactly what an uncheckpointed one records. (torch's default early stop
ends a recomputation at the block's last saved tensor, before the MoE layer records its
statistics; with early stop off it runs the whole block, and the check is what keeps the count.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_state = threading.local()

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
"""Ops whose outputs ``selective`` keeps: the GEMMs and the attention kernels."""


def is_recomputing() -> bool:
    """True while a checkpointed forward runs again inside the backward."""
    return getattr(_state, "depth", 0) > 0


class _Recomputing:
    """Marks a recomputation; reusable, as checkpointing may recompute a block more than once
    (a backward with ``retain_graph``, or saved tensors read twice)."""

    def __init__(self, inner: contextlib.AbstractContextManager | None = None) -> None:
        self.inner = inner

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            if self.inner is not None:
                self.inner.__exit__(*exc)
        finally:
            _state.depth -= 1


def _keep_costly(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _full_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _Recomputing()


def _selective_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_keep_costly)
    return forward_ctx, _Recomputing(recompute_ctx)


def run_checkpointed(mode: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its activations dropped and recomputed in the backward per ``mode``.

    Non-reentrant checkpointing (``use_reentrant=False``): outputs may be any structure, and
    random ops replay the same draws (RNG state is saved and restored).
    """
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    contexts = _full_contexts if mode == "full" else _selective_contexts
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)
