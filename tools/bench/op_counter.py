"""Count what a piece of training code would make a GPU do, without a GPU: one machinery for every budget tool.

``OpCounter`` is a ``TorchDispatchMode``: it sees every ATen operator that runs inside it, below
autograd, so the backward's operators are seen too. Code runs on ``meta`` tensors (nothing is
allocated, any size fits); ``tools.bench.meta_cuda`` makes such a run take the code paths a CUDA run
takes. Each operator becomes one ``OpRecord``, classed as

- nothing (views, empty allocations, ``detach``): no kernel, not recorded;
- ``gemm`` (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``_grouped_mm``): ``2 * M * K * N`` FLOPs;
- ``sdpa`` (the fused attention kernels, forward and backward): FLOPs two ways. ``model_flops``
  count the scores and the weighted sum over the full S x S square, ``4 B H S^2 d`` forward and
  twice that backward (the MFU convention of ``launch/throughput.py``, PaLM appendix B).
  ``flops`` are what a causal FlashAttention-2 kernel executes: half the square, and a backward
  of 2.5x the forward because it recomputes the scores (Dao 2023, "FlashAttention-2", sec. 4.1);
- ``glue``: everything else, with the bytes it reads and writes. Each distinct tensor counts once
  (an argument written in place twice; broadcast dimensions once; an ``index_select`` only the
  rows it gathers); the tensors of a list argument (``_foreach_*``, ``_fused_adamw_``) count
  one by one.

Each record also says

- how many kernels it launches: 1, or for multi-tensor ops (``_foreach_*``, ``_fused_*``) the
  launches of torch's multi-tensor apply, which packs at most ``_MAX_TENSORS[depth]`` tensors and
  320 chunks of 65,536 elements into one launch (``aten/src/ATen/native/cuda/MultiTensorApply.cuh``);
- whether it reads a device value on the host (``_local_scalar_dense`` behind ``.item()``,
  ``bool(t)``; ``nonzero``; a copy to the CPU behind ``.cpu()`` and ``.tolist()``): a host
  synchronisation. On ``meta`` these cannot run; the counter records them and returns zeros;
- whether it accumulates rows into a multi-column tensor by scatter (``index_add`` / ``scatter_add``
  along dim 0, ``index_put`` with ``accumulate``, the embedding gradient): atomics over rows on a
  GPU (a scatter along the last dim, one element per row, is not);
- ``where``: a label the caller's ``where`` function gives at that moment (``tools.bench.step_budget``
  passes the phase and module path).

``MemoryTracker`` (optional) follows the bytes of every tensor storage the ops create until it
is freed, and keeps the peak by the category the caller gives (``track``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"})
SDPA_FORWARD = frozenset({"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"})
SDPA_BACKWARD = frozenset({f"{name}_backward" for name in SDPA_FORWARD})
NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias", "_unsafe_view"})
ACCUMULATING = frozenset({"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "embedding_dense_backward", "_embedding_bag_backward"})
HOST_SYNCS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "item"})

_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
"""Tensors per multi-tensor-apply launch by list depth (``depth_to_max_tensors``, MultiTensorApply.cuh)."""
_MAX_CHUNKS = 320
_CHUNK = 65536


@dataclass
class OpRecord:
    name: str
    kind: str
    """``gemm`` | ``sdpa`` | ``glue``."""
    bytes: int = 0
    flops: int = 0
    """FLOPs the kernel executes."""
    model_flops: int = 0
    """FLOPs the MFU formula counts for it (equal to ``flops`` except for attention)."""
    launches: int = 1
    atomic_rows: bool = False
    host_sync: bool = False
    where: str = ""
    live_bytes: int = 0
    """Bytes of tracked storages alive right after the op (with a ``MemoryTracker``)."""


@dataclass
class Budget:
    """The ops one counted piece of code launched, with totals."""

    ops: list[OpRecord] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return sum(r.launches for r in self.ops)

    @property
    def glue_bytes(self) -> int:
        return sum(r.bytes for r in self.ops if r.kind == "glue")

    @property
    def gemm_flops(self) -> int:
        return sum(r.flops for r in self.ops if r.kind == "gemm")

    @property
    def model_flops(self) -> int:
        """GEMM and attention FLOPs as the MFU formula counts them."""
        return sum(r.model_flops for r in self.ops)

    @property
    def atomics(self) -> list[str]:
        return [r.name for r in self.ops if r.atomic_rows]

    @property
    def host_syncs(self) -> list[str]:
        return [r.name for r in self.ops if r.host_sync]


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 broadcast dims count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def tensors_in(obj: object) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (nested lists, tuples, dicts)."""
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out.extend(tensors_in(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(tensors_in(o))
    return out


def gemm_flops(name: str, args: tuple) -> int:
    """``2 * M * K * N`` of one GEMM operator (``_grouped_mm``: over all groups, 2D x 3D or 2D x 2D)."""
    a, b = args[0], args[1]
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    if name in ("bmm", "baddbmm"):
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2 * a.shape[0] * a.shape[1] * b.shape[-1]


def sdpa_flops(name: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(executed, model) FLOPs of a fused attention op; q, k, v are [B, H, S, d] (k, v may have fewer heads)."""
    q = args[1] if name.endswith("_backward") else args[0]
    B, H, S, d = q.shape
    S_k = args[2 if name.endswith("_backward") else 1].shape[-2]
    square = 4 * B * H * S * S_k * d  # QK^T and PV over every (query, key) pair, forward
    causal = _is_causal(name, args, kwargs)
    executed = square // 2 if causal and S == S_k else square
    if name.endswith("_backward"):
        return executed * 5 // 2, 2 * square
    return executed, square


def _is_causal(name: str, args: tuple, kwargs: dict) -> bool:
    schema = getattr(torch.ops.aten, name).default._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "is_causal":
            return bool(args[i] if i < len(args) else kwargs.get("is_causal", False))
    return False


def multi_tensor_launches(func: torch._ops.OpOverload, args: tuple) -> int:
    """Kernel launches of a ``_foreach_*`` / ``_fused_*`` op under torch's multi-tensor apply."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    depth = min(len(lists), 5)
    chunks = sum(-(-t.numel() // _CHUNK) for t in lists[0])
    return max(1, -(-len(lists[0]) // _MAX_TENSORS[depth]), -(-chunks // _MAX_CHUNKS))


WRITE_ONLY_ARGS = {"adamw_master_": frozenset({"out"})}
"""Arguments a custom op writes in place without reading them (counted once, as a write): the master AdamW kernel
stores the bf16 parameters ``out`` from the updated masters (``kernels.adamw``)."""


def glue_bytes(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> int:
    """Bytes one non-GEMM op reads and writes (see the module docstring)."""
    name = func.overloadpacket.__name__
    seen: dict[int, torch.Tensor] = {}
    for t in tensors_in(args) + tensors_in(kwargs) + tensors_in(out):
        seen.setdefault(id(t), t)
    nbytes = sum(distinct_bytes(t) for t in seen.values())
    for arg, value in zip(func._schema.arguments, args):  # an argument written in place is read and written
        if (arg.alias_info is not None and arg.alias_info.is_write and name not in ("copy_", "_foreach_copy_")  # a copy only writes
                and arg.name not in WRITE_ONLY_ARGS.get(name, ())):
            nbytes += sum(distinct_bytes(t) for t in tensors_in(value))
    if name == "index_select":  # reads only the gathered rows of its source
        src, idx = args[0], args[2]
        nbytes += idx.numel() * (src[0].numel() if src.ndim else 1) * src.element_size() - distinct_bytes(src)
    return nbytes


def _reads_to_host(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """A copy from a device tensor to the CPU (``.cpu()``, ``.tolist()``)."""
    if func.overloadpacket.__name__ not in ("_to_copy", "to", "copy_"):
        return False
    src = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    dst = args[0].device if func.overloadpacket.__name__ == "copy_" else kwargs.get("device")
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"


def _host_value(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> object:
    """What a host read returns on ``meta`` (which has no data): zeros of the right type and shape."""
    name = func.overloadpacket.__name__
    src = args[0]
    if name == "_local_scalar_dense":
        return False if src.dtype == torch.bool else (0 if not src.dtype.is_floating_point else 0.0)
    if name == "nonzero":
        return torch.zeros(0, src.ndim, dtype=torch.int64, device=src.device)
    if name == "masked_select":
        return src.new_zeros(0)
    if name == "copy_":
        return args[0]
    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)


class MemoryTracker:
    """Live bytes of tensor storages, by category, and their peak.

    ``track(t, category)`` registers a storage (once; the first category wins); the storage's
    bytes leave the live total when Python frees it. ``peak`` is the highest live total seen and
    ``at_peak`` its split by category at that moment.
    """

    def __init__(self) -> None:
        self.live: dict[str, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.phase = ""
        """A label the caller sets; ``phase_peaks`` keeps each phase's own peak and split."""
        self.phase_peaks: dict[str, dict[str, int]] = {}

    @property
    def total(self) -> int:
        return sum(self.live.values())

    def track(self, t: torch.Tensor, category: str) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        nbytes = storage.nbytes()
        self.live[category] = self.live.get(category, 0) + nbytes

        def free(_ref: weakref.ref, category: str = category, nbytes: int = nbytes, key: int = key) -> None:
            self.live[category] -= nbytes
            if self._refs.get(key) is _ref:
                del self._refs[key]

        self._refs[key] = weakref.ref(storage, free)
        self.note_peak()

    def note_peak(self) -> None:
        total = self.total
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.live)
        if total > sum(self.phase_peaks.get(self.phase, {}).values()):
            self.phase_peaks[self.phase] = dict(self.live)


class OpCounter(TorchDispatchMode):
    """Records an ``OpRecord`` for every kernel-launching operator dispatched inside it.

    ``where``: called for each op, its result is the op's label. ``memory`` and ``category``:
    every tensor an op returns is tracked under ``category()``.
    """

    def __init__(self, where: Callable[[], str] | None = None, memory: MemoryTracker | None = None,
                 category: Callable[[], str] | None = None) -> None:
        super().__init__()
        self.budget = Budget()
        self.where = where or (lambda: "")
        self.memory = memory
        self.category = category or (lambda: "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        on_device = any(t.device.type != "cpu" for t in tensors_in(args))
        sync = (name in HOST_SYNCS and on_device) or _reads_to_host(func, args, kwargs)
        if sync and any(t.device.type == "meta" for t in tensors_in(args)):  # no data to read: record it, answer zeros
            out = _host_value(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if self.memory is not None:
            for t in tensors_in(out):
                if t.device.type != "cpu":
                    self.memory.track(t, self.category())
        if func.is_view or name in NO_KERNEL:
            return out
        if not sync and all(t.device.type == "cpu" for t in tensors_in(args) + tensors_in(out)):
            return out  # host-side bookkeeping (e.g. an optimizer's CPU step counter): no kernel
        where = self.where()
        live = self.memory.total if self.memory is not None else 0
        if name in GEMMS:
            flops = gemm_flops(name, args)
            self.budget.ops.append(OpRecord(name, "gemm", flops=flops, model_flops=flops, where=where, live_bytes=live))
            return out
        if name in SDPA_FORWARD or name in SDPA_BACKWARD:
            executed, model = sdpa_flops(name, args, kwargs)
            self.budget.ops.append(OpRecord(name, "sdpa", flops=executed, model_flops=model, where=where, live_bytes=live))
            return out
        accumulate = name in ACCUMULATING or (name in ("index_put", "index_put_", "_index_put_impl_") and bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False)))
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        along_rows = not name.startswith(("index_add", "scatter")) or int(args[1]) in (0, -target.ndim if target is not None else 0)
        atomic = accumulate and along_rows and target is not None and target.ndim >= 2 and target.shape[-1] > 1
        launches = multi_tensor_launches(func, args) if name.startswith(("_foreach_", "_fused_")) else 1
        self.budget.ops.append(OpRecord(str(func), "glue", bytes=glue_bytes(func, args, kwargs, out), launches=launches,
                                        atomic_rows=atomic, host_sync=sync, where=where, live_bytes=live))
        return out
