"""Count the places where the host would wait for the device: ``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, ``.cpu()``.

On a GPU each of these blocks the Python thread until every kernel queued before it has finished,
so the host can no longer run ahead and every launch gap of the step shows. On CPU ranks nothing
actually waits, which is why tests need a counter instead of a profiler: ``HostSyncCounter`` patches
the tensor methods that read device memory from Python, and watches the ATen ops whose output
shape depends on tensor values (``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``
without ``output_size``, ``_local_scalar_dense``: how ``item()`` and ``bool()`` reach the device),
so a read inside a torch function is caught too.

Tensors that live on the host by design (a pinned buffer the device copies flags into, a CPU
tensor that only ever holds host values) are marked with ``parallel.host_memory.mark_host`` and not
counted.

    with HostSyncCounter() as syncs:
        trainer_step()
    assert syncs.total == 0, syncs.describe()
"""

from __future__ import annotations

import collections
import os
import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.host_memory import is_host, mark_host

__all__ = ["HostSyncCounter", "is_host", "mark_host"]

_PATCHED = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")

_DATA_DEPENDENT = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
    "aten::equal",
    "aten::is_nonzero",
}
"""Op names (overload stripped) that read tensor values on the host; ``nonzero_static`` and
``repeat_interleave`` with ``output_size`` do not and are filtered in ``_reads``."""

_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _bool_index(args: tuple) -> bool:
    """``x[mask]`` / ``x[mask] = v``: ``aten::index`` / ``index_put_`` with a boolean index (a hidden ``nonzero``)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _reads(func: Any, args: tuple, kwargs: dict) -> bool:
    name = func._schema.name
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return _bool_index(args) and not (isinstance(args[0], torch.Tensor) and is_host(args[0]))
    if name not in _DATA_DEPENDENT or name == "aten::nonzero_static":
        return False
    if name == "aten::repeat_interleave" and (kwargs.get("output_size") is not None or len(args) > 3 and args[3] is not None):
        return False
    first = args[0] if args else None
    return not (isinstance(first, torch.Tensor) and is_host(first))


class HostSyncCounter(TorchDispatchMode):
    """Context manager: counts host reads of device values, by kind and by calling line (``sites``).

    With ``model``, each site also names the innermost of its modules whose forward was running
    (``... in blocks.1.ffn``), so a read inside a layer is told per layer."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self._depth = 0
        self._saved: dict[str, Any] = {}
        self._names = {id(m): n for n, m in model.named_modules() if n} if model is not None else {}
        self._stack: list[str] = []
        self._hooks: list[Any] = []

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def describe(self) -> str:
        """One line per calling site: ``count x kind at file:line``."""
        return "; ".join(f"{n} x {site}" for site, n in self.sites.most_common()) or "no host syncs"

    def _record(self, kind: str) -> None:
        self.kinds[kind] += 1
        where = f" in {self._stack[-1]}" if self._stack else ""
        self.sites[f"{kind} at {_caller()}{where}"] += 1

    def _enter_module(self, module: torch.nn.Module, _inputs: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _leave_module(self, module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        if id(module) in self._names and self._stack:
            self._stack.pop()

    def _wrap(self, name: str, original: Any) -> Any:
        counter = self

        def patched(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter._depth == 0 and not is_host(t):
                counter._record(name.strip("_") if name != "__bool__" else "bool")
            counter._depth += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                counter._depth -= 1

        return patched

    def __enter__(self) -> HostSyncCounter:
        for name in _PATCHED:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        self._saved_nonzero = torch.nonzero
        torch.nonzero = self._wrap("nonzero", self._saved_nonzero)  # type: ignore[assignment]
        if self._names:
            self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                           torch.nn.modules.module.register_module_forward_hook(self._leave_module)]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._stack = [], []
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        torch.nonzero = self._saved_nonzero  # type: ignore[assignment]
        self._saved.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._depth == 0 and _reads(func, args, kwargs):
            self._record(func._schema.name.removeprefix("aten::"))
        self._depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= 1


def _caller() -> str:
    """The innermost stack frame outside torch and this file, as ``path:line (function)``."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            return f"{os.path.relpath(path)}:{frame.lineno} ({frame.name})"
    return "?"
