"""Tensors that live in host memory by design, so reading them never waits for a device.

The trainer reads a few tensors every step on purpose: a pinned buffer the device copies the
step's flags into, a CPU tensor of host flags all-reduced over gloo, AdamW's ``step`` counters
(torch keeps them on the host unless the optimizer is fused or capturable). On CPU ranks every
tensor is a CPU tensor, so ``tools.bench.host_syncs`` cannot tell these from device reads by their
device; the code that creates them marks them here instead.
"""

from __future__ import annotations

from torch import Tensor

_ATTR = "_moeforge_host"


def mark_host(t: Tensor) -> Tensor:
    """Mark ``t`` as host memory by design; returns ``t``."""
    setattr(t, _ATTR, True)
    return t


def is_host(t: Tensor) -> bool:
    """Whether ``t`` was marked by ``mark_host`` (views and results of ops on it are not)."""
    return bool(getattr(t, _ATTR, False))
