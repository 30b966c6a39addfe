"""The one question model code asks of autocast: in which dtype does CUDA autocast run this tensor's GEMMs?

Backends that call library GEMMs or Triton kernels (``torch._grouped_mm``, moeforge's kernels, the
router's fp32-output GEMM) are outside autocast's op lists, so they cast their inputs themselves,
to the dtype autocast would use. ``meta`` tensors stand for CUDA ones in the budget tools
(``tools.step_budget`` counts a step on ``meta``); autocast has no ``meta`` device, so their
answer is the dtype of the innermost ``meta_autocast`` block (None outside one).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_meta = threading.local()


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """CUDA autocast's dtype for ``x`` while it is on (``meta``: ``meta_autocast``'s), else None."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if x.device.type == "meta":
        return getattr(_meta, "dtype", None)
    return None


@contextlib.contextmanager
def meta_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, ``autocast_dtype`` of a ``meta`` tensor is ``dtype`` (None: autocast off)."""
    before = getattr(_meta, "dtype", None)
    _meta.dtype = dtype
    try:
        yield
    finally:
        _meta.dtype = before
