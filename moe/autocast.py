"""The one question model code asks of autocast: in which dtype does CUDA autocast run this tensor's GEMMs?

Backends that call library GEMMs or Triton kernels (``torch._grouped_mm``, moeforge's kernels, the
router's fp32-output GEMM) are outside autocast's op lists, so they cast their inputs themselves,
to the dtype autocast would use. ``meta`` tensors stand for CUDA ones in the budget tools
(``tools.bench.step_budget`` counts a step on ``meta``); autocast has no ``meta`` device, so their
answer comes from the function the innermost ``meta_autocast`` block installed (None outside one).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_meta = threading.local()


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """CUDA autocast's dtype for ``x`` while it is on (``meta``: ``meta_autocast``'s), else None."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if x.device.type == "meta":
        source = getattr(_meta, "source", None)
        return source() if source is not None else None
    return None


GPU_PATH_DEVICES = ("cuda", "meta")
"""Device types that take the model's GPU code paths (fused kernels): CUDA, and ``meta`` standing for it in the budget tools."""


def gpu_path_device(device: torch.device) -> bool:
    """Whether ops on ``device`` take the GPU code paths (CUDA, or ``meta`` standing for it)."""
    return device.type in GPU_PATH_DEVICES


def takes_gpu_path(x: Tensor) -> bool:
    """Whether ``x``'s ops take the GPU code paths (a CUDA tensor, or a ``meta`` one standing for it)."""
    return gpu_path_device(x.device)


@contextlib.contextmanager
def meta_autocast(source: Callable[[], torch.dtype | None]) -> Iterator[None]:
    """Inside, ``autocast_dtype`` of a ``meta`` tensor is ``source()`` (None: autocast off at that moment)."""
    before = getattr(_meta, "source", None)
    _meta.source = source
    try:
        yield
    finally:
        _meta.source = before
