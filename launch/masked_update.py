"""An optimizer step that a device-side flag can cancel, and gradient clipping folded into it.

The trainer decides whether a step is finite on the device (``StepGuard.post`` returns a bool
tensor ``ok``) and reads the verdict later, so the optimizer step has to obey ``ok`` without the
host knowing it. A cancelled step leaves every weight and every optimizer state tensor (moments
and step count) exactly as they were:

- fused AdamW (CUDA): torch's fused kernel takes ``found_inf`` (skip the update when nonzero, and
  take back the step count it added) and ``grad_scale`` (divide every gradient by it), the two
  tensors ``torch.amp.GradScaler`` hands it. ``grad_scale`` carries the clipping coefficient, so
  clipping costs no separate pass over the gradients: ``g / max(1, (|g| + 1e-6) / max_norm)`` is
  ``torch.nn.utils.clip_grad_norm_``'s ``g * min(1, max_norm / (|g| + 1e-6))`` up to rounding.
- ``launch.kernel_adamw.KernelAdamW`` (``optim.moments_dtype=bf16``) takes the same two tensors, on any
  device and over DTensor parameters' local shards.
- any other optimizer (torch's default AdamW on CPU, DTensor parameters): the step runs, then each
  updated tensor is put back with ``torch.where(ok, new, old)`` from a copy taken before it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from launch.kernel_adamw import KernelAdamW
from parallel.host_memory import mark_host
from parallel.dense import local_tensor


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` applies ``found_inf``/``grad_scale`` itself (fused AdamW over plain tensors;
    ``KernelAdamW`` always, on each rank's local shards)."""
    if isinstance(optimizer, KernelAdamW):
        return True
    return (isinstance(optimizer, torch.optim.AdamW) and all(bool(g.get("fused")) for g in optimizer.param_groups)
            and not any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]))


def clip_scale(grad_norm: Tensor, max_norm: float) -> Tensor | None:
    """The divisor that clips gradients of norm ``grad_norm`` to ``max_norm`` (None: no clipping)."""
    if max_norm <= 0:
        return None
    return torch.clamp((grad_norm.float() + 1e-6) / max_norm, min=1.0)


@torch.no_grad()
def masked_step(optimizer: torch.optim.Optimizer, ok: Tensor, grad_scale: Tensor | None = None) -> None:
    """``optimizer.step()`` when ``ok`` (0-dim bool tensor), otherwise nothing changes; no host read.

    ``grad_scale``: divide the gradients by it first (only for optimizers that ``takes_found_inf``).
    """
    if takes_found_inf(optimizer):
        optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
        return
    if grad_scale is not None:
        raise ValueError("grad_scale needs an optimizer that applies it (fused AdamW); clip the gradients first")
    touched = _updated(optimizer)
    saved = [t.clone() for t in touched]
    optimizer.step()
    for t, old in zip(touched, saved):
        t.copy_(torch.where(ok.to(t.device), t, old))


def _updated(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The local storage of every parameter a step will update and of each of its state tensors."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            out.append(local_tensor(p.detach()))
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), Tensor) and not state["step"].is_cuda:
                mark_host(state["step"])  # torch's own AdamW reads it with .item(): host memory by design
            out.extend(local_tensor(v) for v in state.values() if isinstance(v, Tensor))
    return out
