"""Where a layer step's GPU time goes: per-kernel times of one MoELayer forward+backward, per backend.

Usage:
    python -m tools.bench.profile_layer --out profile.txt                 # reference shapes, grouped_mm and triton
    python -m tools.bench.profile_layer --shape 1024 2816 16 2 16384 --backends grouped_mm

Shape legend: D model dim, F expert ffn dim, E experts, K top-k, T tokens.

For each shape and backend, the whole ``moe.layer.MoELayer`` (router topk, statistics on, bf16,
balanced forced routing as in ``tools.bench.layer``) runs a few warm-up steps, then
``torch.profiler`` records 3 forward+backward steps. Kernel times are summed by name and divided
by 3. GEMM kernels (library GEMMs and the Triton GEMM kernels) are told apart from the rest by
name; the table gives each class's total, the GEMM rate (useful 18*T*K*D*F FLOPs over the GEMM
time), and the largest kernels. Writes the full listing to ``--out`` and prints the summary table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from launch.profiling import GEMM_KERNEL
from tools.bench.shapes import REFERENCE_SHAPES

STEPS = 3


def profile_shape(shape: tuple[int, int, int, int, int], backend: str, top: int) -> tuple[dict[str, float], list[str]]:
    """(summary numbers, listing lines) of one backend at one shape."""
    from torch.profiler import ProfilerActivity, profile

    from tools.bench.layer import Problem, build_layer, useful_flops
    from moe.routers import RouterContext

    D, F_, E, K, T = shape
    p = Problem.make(shape, "balanced", 1.2, 0, torch.device("cuda"), torch.bfloat16)
    layer = build_layer(p, backend)
    x = p.x.clone().requires_grad_()
    ctx = RouterContext()

    params = [x, *layer.parameters()]

    def step() -> None:
        for t in params:  # as the bench and a trainer's zero_grad(set_to_none=True): no gradient accumulation kernels
            t.grad = None
        y, aux = layer(x, ctx)
        torch.autograd.backward([y, sum(aux.values())], [p.dy, torch.ones((), device="cuda")])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(evt.name, [0.0, 0])
            entry[0] += evt.device_time / 1e3 / STEPS  # ms per step
            entry[1] += 1
    gemm_ms = sum(ms for name, (ms, _) in totals.items() if GEMM_KERNEL.search(name))
    all_ms = sum(ms for ms, _ in totals.values())
    launches = sum(n for _, n in totals.values()) / STEPS
    numbers = {"total_ms": all_ms, "gemm_ms": gemm_ms, "other_ms": all_ms - gemm_ms, "launches": launches,
               "gemm_tflops": useful_flops(T, K, D, F_) / (gemm_ms * 1e-3) / 1e12 if gemm_ms else float("nan")}
    lines = [f"### shape d={D} f={F_} E={E} k={K} T={T} backend={backend}: kernel total {all_ms:.2f} ms/step, "
             f"GEMM {gemm_ms:.2f} ms ({numbers['gemm_tflops']:.0f} TFLOP/s useful), other {all_ms - gemm_ms:.2f} ms, {launches:.0f} launches/step"]
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        tag = "GEMM " if GEMM_KERNEL.search(name) else "     "
        lines.append(f"    {tag}{ms:8.3f} ms  x{n / STEPS:<4.0f} {name[:110]}")
    del layer, x, p
    torch.cuda.empty_cache()
    return numbers, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.profile_layer", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=5, action="append", metavar=("D", "F", "E", "K", "T"))
    parser.add_argument("--backends", nargs="+", default=["grouped_mm", "triton"])
    parser.add_argument("--top", type=int, default=14, help="kernels listed per (shape, backend)")
    parser.add_argument("--out", type=Path, default=None, help="write the full listing here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_layer: needs a CUDA GPU; nothing was profiled", file=sys.stderr)
        return 1
    shapes = [tuple(s) for s in args.shape] if args.shape else REFERENCE_SHAPES
    listing: list[str] = []
    table = ["| D | F | E | K | T | backend | kernel ms | GEMM ms | GEMM TFLOP/s | other ms | launches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for backend in args.backends:
            try:
                n, lines = profile_shape(shape, backend, args.top)
            except Exception as exc:  # one failure must not hide the others
                listing.append(f"### {shape} {backend}: {type(exc).__name__}: {exc}")
                continue
            listing += lines
            table.append(f"| {' | '.join(map(str, shape))} | {backend} | {n['total_ms']:.2f} | {n['gemm_ms']:.2f} | {n['gemm_tflops']:.0f} | {n['other_ms']:.2f} | {n['launches']:.0f} |")
    text = "\n".join(table) + "\n\n" + "\n".join(listing) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
