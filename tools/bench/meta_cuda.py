"""Run training code on ``meta`` tensors the way it would run on a CUDA card, for the budget tools.

``meta`` tensors have shapes and dtypes but no data, so a whole preset's step runs on a laptop.
Where torch itself behaves differently on ``meta`` than on CUDA, ``on_card`` stands in for CUDA:

- **autocast** has no ``meta`` device. ``CudaAutocast`` applies CUDA autocast's casting rules
  (PyTorch "Automatic Mixed Precision" reference, "CUDA Ops that can autocast to float16 /
  float32 / widest input type") above autograd, so the casts and their backward appear as in a
  CUDA step: ops in ``LOWER`` cast floating inputs to the autocast dtype (a leaf tensor that
  requires grad, i.e. a weight, is cast once per autocast block and the cast reused, as
  autocast's weight cache does); ops in ``WIDEST`` cast to the widest input type; every other op
  that torch registers a CUDA autocast kernel for (``torch._C._dispatch_dump_table``) runs in
  fp32. ``moe.autocast.autocast_dtype`` answers for ``meta`` tensors inside it.
- **scaled_dot_product_attention** picks its kernel per device; on ``meta`` it decomposes into
  the math path. ``on_card`` sends it to the kernel CUDA picks for these inputs (FlashAttention-2
  for bf16/fp16 without a mask and head dim <= 256; the memory-efficient kernel otherwise).
- **foreach/fused optimizers** default to per-parameter loops off CUDA; ``on_card`` lists
  ``meta`` among the devices torch's optimizers treat like CUDA, so ``torch.optim.AdamW``
  takes the path it takes on the card.
- **the card**: ``torch.cuda.get_device_name`` / ``get_device_capability`` answer for the card
  named (``tools.bench.card_rates.CARDS``), for code that picks a path per card.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

from moe.autocast import autocast_dtype, meta_autocast

LOWER = frozenset({"matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "addr", "mv", "linear", "chain_matmul", "multi_dot",
                   "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
                   "scaled_dot_product_attention"})
"""CUDA autocast's lower-precision ops (the reference's "can autocast to float16" list, and SDPA)."""
WIDEST = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put", "scatter_add", "tensordot"})
"""CUDA autocast's ops that run in the widest input type."""


@functools.lru_cache(maxsize=None)
def _has_cuda_autocast_kernel(name: str) -> bool:
    """Whether torch registers a CUDA autocast kernel for some overload of ``aten::name``."""
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if packet is None or not hasattr(packet, "overloads"):
        return False
    for overload in packet.overloads():
        qualified = f"aten::{name}" if overload == "default" else f"aten::{name}.{overload}"
        try:
            table = torch._C._dispatch_dump_table(qualified)
        except RuntimeError:
            continue
        if any(line.startswith("AutocastCUDA:") and "fallthrough" not in line for line in table.splitlines()):
            return True
    return False


def _op_name(func: object) -> str:
    """The ATen-style name of a torch function (``Tensor.__matmul__`` and ``__rmatmul__`` -> matmul)."""
    name = getattr(func, "__name__", "").strip("_")
    return "matmul" if name == "rmatmul" else name


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts for ``meta`` tensors (module docstring); ``dtype`` is the lower precision.

    Entered once around the whole counted code; it casts only inside ``region()`` (what the
    trainer's ``with autocast:`` gets) and while activation checkpointing recomputes a forward
    in the backward (``moe.recompute.is_recomputing``; torch's checkpoint re-enters the
    forward's autocast state there too). Outside, the backward runs uncast, as on CUDA.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype
        self.enabled = False
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stack = contextlib.ExitStack()

    def active(self) -> bool:
        from moe.recompute import is_recomputing

        return self.enabled or is_recomputing()

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        """Autocast on inside (its weight-cast cache is dropped on leaving, as autocast's is)."""
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False
            self._cache.clear()

    def __enter__(self) -> CudaAutocast:
        from moe import recompute

        self._stack.enter_context(meta_autocast(lambda: self.dtype if self.active() else None))
        # torch function modes do not follow the autograd engine into the backward: push this one
        # again while a checkpointed forward is recomputed there
        enter, exit_ = recompute._Recomputing.__enter__, recompute._Recomputing.__exit__

        def recompute_enter(ctx: object) -> None:
            enter(ctx)
            TorchFunctionMode.__enter__(self)

        def recompute_exit(ctx: object, *exc: object) -> None:
            TorchFunctionMode.__exit__(self, *exc)
            exit_(ctx, *exc)

        self._stack.enter_context(mock.patch.object(recompute._Recomputing, "__enter__", recompute_enter))
        self._stack.enter_context(mock.patch.object(recompute._Recomputing, "__exit__", recompute_exit))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._stack.close()
        self._cache.clear()

    def _cast(self, t: object, dtype: torch.dtype) -> object:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype or t.dtype == torch.float64:
            return t
        if t.is_leaf and t.requires_grad and dtype == self.dtype:
            hit = self._cache.get(id(t))
            if hit is None or hit[0] is not t:
                hit = (t, t.to(dtype))
                self._cache[id(t)] = hit
            return hit[1]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if not self.active() or "out" in kwargs:  # autocast has kernels for the functional overloads only, none for out=
            return func(*args, **kwargs)
        name = _op_name(func)
        target = None
        if name in LOWER:
            target = self.dtype
        elif name in WIDEST:
            floats = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            target = functools.reduce(torch.promote_types, floats) if floats else None
        elif name and _has_cuda_autocast_kernel(name):
            target = torch.float32
            if not any(isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args):
                target = None
        if target is not None:
            args = tuple(self._cast(a, target) for a in args)
            kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # type: ignore[no-untyped-def]
    """``F.scaled_dot_product_attention`` through the kernel CUDA would pick (module docstring)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def on_card(name: str, capability: tuple[int, int]) -> Iterator[None]:
    """``meta`` runs take card ``name``'s paths: SDPA kernel choice, foreach/fused optimizers, the
    card's name and compute capability (module docstring)."""
    from torch.utils import _foreach_utils
    from torch.optim import optimizer as optim_module

    foreach = _foreach_utils._get_foreach_kernels_supported_devices() + ["meta"]
    fused = _foreach_utils._get_fused_kernels_supported_devices() + ["meta"]
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        if query.device.type != "meta":
            return real_sdpa(query, key, value, *args, **kwargs)
        dtype = autocast_dtype(query) or query.dtype  # SDPA is on autocast's lower-precision list
        return _cuda_sdpa(query.to(dtype), key.to(dtype), value.to(dtype), *args, **kwargs)

    with contextlib.ExitStack() as stack:
        for module in (_foreach_utils, optim_module):
            stack.enter_context(mock.patch.object(module, "_get_foreach_kernels_supported_devices", lambda: foreach))
            stack.enter_context(mock.patch.object(module, "_get_fused_kernels_supported_devices", lambda: fused))
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_name", lambda *a, **k: name))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: capability))
        yield
