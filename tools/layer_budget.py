"""What one MoE layer step costs a GPU, counted without a GPU: launches, bytes, FLOPs, atomics, syncs.

Usage:
    python -m tools.layer_budget                     # the four reference shapes, backend grouped_mm
    python -m tools.layer_budget --shape 2048 768 128 8 32768 --ops   # one shape, every op listed

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, R routed rows (T*K).

The whole ``moe.layer.MoELayer`` (router ``topk`` with its balance and z losses, dispatch,
experts, combine, routing statistics) runs one training forward and backward in bf16 on ``meta``
tensors, so nothing is allocated and any shape fits, under a ``TorchDispatchMode`` that sees
every operator the GPU would launch (moeforge's own ops are ``torch.library`` custom ops, one
launch each; ``meta`` takes the GPU code path wherever the code branches on the device). Each op
is classed as

- a view (no kernel: views, empty allocations) -- not counted;
- a GEMM (``mm``, ``addmm``, ``bmm``, ``_grouped_mm``): its FLOPs, ``2 * M * K * N``;
- glue: everything else, with the bytes it reads and writes (each distinct tensor once, twice
  when it is updated in place; an ``index_select`` reads only the rows it gathers; broadcast
  dimensions count once);

and flagged when it accumulates into a multi-column tensor by scatter (``index_add``,
``scatter_add``, ``index_put`` with ``accumulate``: atomics over routed rows on a GPU) or reads a
device value on the host (``_local_scalar_dense``, ``nonzero``: a synchronisation).

``predicted_ms`` turns a count into a time: GEMM FLOPs at 680 TFLOP/s (the library grouped GEMM
measured on an H200) plus glue bytes at 3 TB/s, ignoring launch gaps. ``minimum_glue_bytes``
is the least any implementation built on library GEMMs must move (see its docstring).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tools.bench_shapes import REFERENCE_SHAPES, Shape

GEMM_TFLOPS = 680.0
GLUE_TBPS = 3.0

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"}
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias"}
_ACCUMULATING = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "embedding_dense_backward", "_embedding_bag_backward"}
_HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "item"}


@dataclass
class OpRecord:
    name: str
    kind: str  # "gemm" | "glue"
    bytes: int = 0
    flops: int = 0
    atomic_rows: bool = False
    host_sync: bool = False


@dataclass
class Budget:
    """Totals of one layer step (forward + backward)."""

    ops: list[OpRecord] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def glue_bytes(self) -> int:
        return sum(r.bytes for r in self.ops if r.kind == "glue")

    @property
    def gemm_flops(self) -> int:
        return sum(r.flops for r in self.ops if r.kind == "gemm")

    @property
    def atomics(self) -> list[str]:
        return [r.name for r in self.ops if r.atomic_rows]

    @property
    def host_syncs(self) -> list[str]:
        return [r.name for r in self.ops if r.host_sync]

    def predicted_ms(self, tflops: float = GEMM_TFLOPS, tbps: float = GLUE_TBPS) -> float:
        return self.gemm_flops / (tflops * 1e12) * 1e3 + self.glue_bytes / (tbps * 1e12) * 1e3


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 broadcast dims count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(obj: object) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out.extend(_tensors(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(_tensors(o))
    return out


def _gemm_flops(name: str, args: tuple, out: object) -> int:
    a, b = args[0], args[1]
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    if name in ("bmm", "baddbmm"):
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2 * a.shape[0] * a.shape[1] * b.shape[-1]  # mm, and _grouped_mm (2D x 3D or 2D x 2D)


class OpCounter(TorchDispatchMode):
    """Records an ``OpRecord`` for every kernel-launching operator dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = Budget()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_KERNEL:
            return out
        if name in _GEMMS:
            self.budget.ops.append(OpRecord(name, "gemm", flops=_gemm_flops(name, args, out)))
            return out
        seen: dict[int, torch.Tensor] = {}
        for t in _tensors(args) + _tensors(kwargs) + _tensors(out):
            seen.setdefault(id(t), t)
        nbytes = sum(_distinct_bytes(t) for t in seen.values())
        for arg, value in zip(func._schema.arguments, args):  # an argument written in place is read and written
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor) and name != "copy_":
                nbytes += _distinct_bytes(value)
        if name == "index_select":  # reads only the gathered rows of its source
            src, idx = args[0], args[2]
            nbytes += idx.numel() * (src[0].numel() if src.ndim else 1) * src.element_size() - _distinct_bytes(src)
        accumulate = name in _ACCUMULATING or (name in ("index_put", "index_put_", "_index_put_impl_") and bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False)))
        target = args[0] if isinstance(args[0], torch.Tensor) else None
        atomic = accumulate and target is not None and target.ndim >= 2 and target.shape[-1] > 1
        self.budget.ops.append(OpRecord(str(func), "glue", bytes=nbytes, atomic_rows=atomic, host_sync=name in _HOST_SYNCS))
        return out


def count_layer_step(shape: Shape, backend: str = "grouped_mm", dtype: torch.dtype = torch.bfloat16) -> Budget:
    """One training forward + backward of ``MoELayer`` (router topk, statistics on) at ``shape`` on meta tensors."""
    from moe.experts import ExpertsConfig
    from moe.layer import MoELayer
    from moe.routers import RouterContext
    from moe.routers.topk import TopKConfig

    D, F_, E, K, T = shape
    with torch.device("meta"):
        layer = MoELayer(D, F_, E, TopKConfig(k=K), ExpertsConfig(backend=backend)).to(dtype)
        x = torch.empty(T, D, dtype=dtype, requires_grad=True)
        dy = torch.empty(T, D, dtype=dtype)
    layer.train()
    layer.resolve_backend(torch.device("meta"))
    counter = OpCounter()
    with counter:
        y, aux = layer(x, RouterContext())
        torch.autograd.backward([y, sum(aux.values())], [dy, torch.ones((), device="meta")])
    return counter.budget


def minimum_glue_bytes(shape: Shape, element_bytes: int = 2) -> int:
    """The least glue traffic of a layer step whose GEMMs are library calls on contiguous rows.

    A library grouped GEMM reads its A operand as expert-sorted rows and cannot fuse a gather,
    an activation or a scatter, so at the least (elements; R = T*K rows):

    - forward: gather x into expert order (read R rows, write R rows: 2RD); SwiGLU between the
      GEMMs (read g and u, write h: 3RF); combine the down projection's rows into tokens (read
      RD, write TD);
    - backward: gather dy (2RD); SwiGLU backward (read g, u and dL/dh, write dg and du: 5RF);
      combine the dgrad rows into dx (read RD with gate and up as one [D, 2F] GEMM, write TD).

    Total ``6RD + 8RF + 2TD`` elements. Router, dispatch and statistics work on T*E and T*K
    values, below 1% of this at the reference shapes, and are left out of the minimum.
    """
    D, F_, E, K, T = shape
    R = T * K
    return (6 * R * D + 8 * R * F_ + 2 * T * D) * element_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.layer_budget", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, action="append", metavar=("D", "F", "E", "K", "T"), help="repeatable; default: the reference shapes")
    parser.add_argument("--backend", default="grouped_mm")
    parser.add_argument("--ops", action="store_true", help="list every counted op")
    args = parser.parse_args(argv)
    shapes = [tuple(s) for s in args.shape] if args.shape else REFERENCE_SHAPES
    print("| D | F | E | K | T | launches | glue GB | minimum GB | ratio | GEMM TFLOP | atomics | syncs | predicted ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        b = count_layer_step(shape, args.backend)
        lo = minimum_glue_bytes(shape)
        print(f"| {' | '.join(map(str, shape))} | {b.launches} | {b.glue_bytes / 1e9:.2f} | {lo / 1e9:.2f} | {b.glue_bytes / lo:.2f} | "
              f"{b.gemm_flops / 1e12:.2f} | {len(b.atomics)} | {len(b.host_syncs)} | {b.predicted_ms():.2f} |")
        if args.ops:
            for r in b.ops:
                print(f"    {r.kind:4s} {r.name:60s} {r.bytes / 1e6:10.1f} MB {r.flops / 1e9:10.1f} GFLOP{'  ATOMIC' if r.atomic_rows else ''}{'  SYNC' if r.host_sync else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
