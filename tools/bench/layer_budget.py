"""What one MoE layer step costs a GPU, counted without a GPU: launches, bytes, FLOPs, atomics, syncs.

Usage:
    python -m tools.bench.layer_budget                     # the four reference shapes, backend grouped_mm
    python -m tools.bench.layer_budget --shape 2048 768 128 8 32768 --ops   # one shape, every op listed

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, R routed rows (T*K).

The whole ``moe.layer.MoELayer`` (router ``topk`` with its balance and z losses, dispatch,
experts, combine, routing statistics) runs one training forward and backward in bf16 on ``meta``
tensors, so nothing is allocated and any shape fits, under ``tools.bench.op_counter.OpCounter`` (the
counting machinery ``tools.bench.step_budget`` shares), which sees every operator the GPU would launch (moeforge's own ops are ``torch.library`` custom ops, one
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

import torch

from tools.bench.op_counter import Budget, OpCounter, OpRecord
from tools.bench.shapes import REFERENCE_SHAPES, Shape

__all__ = ["Budget", "OpCounter", "OpRecord", "count_layer_step", "minimum_glue_bytes", "predicted_ms"]

GEMM_TFLOPS = 680.0
GLUE_TBPS = 3.0


def predicted_ms(budget: Budget, tflops: float = GEMM_TFLOPS, tbps: float = GLUE_TBPS) -> float:
    """GEMM FLOPs at ``tflops`` plus glue bytes at ``tbps``, launch gaps ignored."""
    return budget.gemm_flops / (tflops * 1e12) * 1e3 + budget.glue_bytes / (tbps * 1e12) * 1e3


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
    parser = argparse.ArgumentParser(prog="python -m tools.bench.layer_budget", description=__doc__.splitlines()[0])
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
              f"{b.gemm_flops / 1e12:.2f} | {len(b.atomics)} | {len(b.host_syncs)} | {predicted_ms(b):.2f} |")
        if args.ops:
            for r in b.ops:
                print(f"    {r.kind:4s} {r.name:60s} {r.bytes / 1e6:10.1f} MB {r.flops / 1e9:10.1f} GFLOP{'  ATOMIC' if r.atomic_rows else ''}{'  SYNC' if r.host_sync else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
