"""Benchmark one MoE layer (router + dispatch + experts + combine), forward+backward in bf16, on one GPU.

Usage:
    python -m tools.bench_layer --out bench_out            # the four reference shapes
    python -m tools.bench_layer --quick --out bench_out    # small shapes, a smoke run
    python -m tools.bench_layer --autotune --out bench_out # also sweep the Triton block sizes
    TRITON_INTERPRET=1 python -m tools.bench_layer --device cpu --dtype fp32 --shape 32 64 4 2 64 --autotune
        # a CPU smoke run of the whole bench (tests run it; its times mean nothing)

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, R routed rows.

Every backend gets the same seed, input and routing: the router's logits get a fixed +8 bias
on a routing drawn once per (shape, routing) - balanced (exactly T*K/E rows per expert) or
Zipf-skewed (expert popularity proportional to 1/rank^s) - so top-k picks the same experts for
all. Backends: ``torch`` (per-expert loop), ``capacity_bmm`` (GShard-style capacity factor
1.25, padded [E, C, D] buffers through torch.bmm, overflow dropped), ``grouped_mm``
(torch._grouped_mm), ``triton`` (kernels.moe_experts) and ``megablocks`` when importable.
Reference columns: ``bmm_ceiling`` (the same SwiGLU FLOPs through torch.bmm on balanced equal
groups, no routing) and ``dense_gemm`` (one bf16 GEMM [T*K, D] x [D, 3F] forward+backward: the
same 18*T*K*D*F useful FLOPs). Times are CUDA-event medians after warm-up; TFLOP/s counts the
useful 18*T*K*D*F; ``vs_dense`` = dense GEMM time / backend time; peak memory is above what was
allocated before the timed loop; the error is max |y - y_fp32| / max |y_fp32| against the fp32
reference on the backend's own plan. Writes ``results.json`` and ``results.md`` to ``--out``;
the markdown ends with the kernel issue's targets per (shape, routing): triton's speedup over
grouped_mm (target >= 1.15x) and the bmm ceiling's time over triton's (stretch: >= 1).
``--autotune`` times every ``AUTOTUNE_BLOCKS`` configuration on the first routing of each shape
and uses the fastest for all routings of that shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.bench_shapes import QUICK_SHAPES, REFERENCE_SHAPES as SHAPES
from moe.dispatch import DispatchPlan, capacity, combine, dispatch, gather_rows
from moe.routers.base import RoutingDecision

ROUTING_BIAS = 8.0
CAPACITY_FACTOR = 1.25
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
AUTOTUNE_BLOCKS = [  # "bm,bn,bk,warps,stages,br,bwd_bn" (kernels.layout.BlockSizes.parse; experts.kernel_blocks)
    # Each compiles for sm_90 with no register spills and >= 8 resident warps per SM in every
    # GEMM kernel at the four reference shapes (python -m kernels.compile_check --blocks ...);
    # 128,256 tiles spill in swiglu_fwd and grouped_wgrad and 128,64 with 4 warps in swiglu_bwd.
    "128,128,64,8,3,64,64", "128,128,64,8,4,64,64", "128,128,32,8,4,32,64", "128,64,64,8,4,64,64",
    "64,128,64,8,3,64,64", "64,64,64,4,4,64,64", "64,128,32,4,4,32,32",
]

Weights = tuple[Tensor, Tensor, Tensor]
ExpertRun = Callable[[Tensor, DispatchPlan, Weights, int], Tensor]


def useful_flops(T: int, K: int, D: int, F_: int) -> int:
    """Forward+backward FLOPs of the routed SwiGLU: 3 GEMMs of 2*T*K*D*F forward, twice that backward."""
    return 18 * T * K * D * F_


def routing_ids(T: int, E: int, K: int, kind: str, zipf_s: float, gen: torch.Generator) -> Tensor:
    """int64 [T, K] distinct experts per token; balanced = exactly T*K/E per expert when it divides."""
    if kind == "balanced":
        slots = torch.arange(T * K).reshape(T, K)
        ids = slots % E  # distinct inside a token because K <= E
        return ids[torch.randperm(T, generator=gen)]
    popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** zipf_s
    ids = torch.multinomial(popularity.expand(T, E), K, replacement=False, generator=gen)
    return torch.randperm(E, generator=gen)[ids]  # the hot expert lands on a random index


def route(x_TD: Tensor, w_router_DE: Tensor, bias_TE: Tensor, K: int, capacity_factor: float | None) -> DispatchPlan:
    """Softmax router with the fixed routing bias; top-K weights renormalised; then dispatch."""
    probs_TE = torch.softmax((x_TD @ w_router_DE).float() + bias_TE, dim=-1)
    weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    decision = RoutingDecision(expert_ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE)
    return dispatch(decision, w_router_DE.shape[1], capacity_factor)


def _gathered(swiglu: Callable[..., Tensor]) -> ExpertRun:
    def run(x_TD: Tensor, plan: DispatchPlan, w: Weights, K: int) -> Tensor:
        return combine(swiglu(gather_rows(x_TD, plan), plan.counts_E, *w), plan, x_TD.shape[0])

    return run


def capacity_bmm(x_TD: Tensor, plan: DispatchPlan, w: Weights, K: int) -> Tensor:
    """GShard-style experts: rows placed in a zero-padded [E, C, D] buffer, three torch.bmm, rows read back.

    ``plan`` must come from ``dispatch(..., capacity_factor)`` so no expert holds more than C rows.
    """
    T, D = x_TD.shape
    E, R = plan.counts_E.shape[0], plan.num_rows
    C = capacity(T, K, E, CAPACITY_FACTOR)
    expert_R = torch.repeat_interleave(torch.arange(E, device=x_TD.device), plan.counts_E, output_size=R)
    place_R = expert_R * C + torch.arange(R, device=x_TD.device) - plan.offsets_E1[expert_R]
    x_ECD = x_TD.new_zeros(E * C, D).index_copy(0, place_R, gather_rows(x_TD, plan)).view(E, C, D)
    h_ECF = F.silu(torch.bmm(x_ECD, w[0])) * torch.bmm(x_ECD, w[1])
    y_RD = torch.bmm(h_ECF, w[2]).view(E * C, D).index_select(0, place_R)
    return combine(y_RD, plan, T)


def build_backends(blocks: object | None) -> dict[str, tuple[ExpertRun, float | None]]:
    """name -> (expert runner, capacity factor); backends that cannot load are left out with a note."""
    from moe.experts import swiglu_grouped_mm, swiglu_loop

    backends: dict[str, tuple[ExpertRun, float | None]] = {
        "torch": (_gathered(swiglu_loop), None),
        "capacity_bmm": (capacity_bmm, CAPACITY_FACTOR),
        "grouped_mm": (_gathered(swiglu_grouped_mm), None),
    }
    try:
        from kernels.moe_experts import fused_moe_experts

        def triton_run(x_TD: Tensor, plan: DispatchPlan, w: Weights, K: int) -> Tensor:
            return fused_moe_experts(x_TD, plan.slot_idx_R, plan.weight_R, plan.counts_E, K, *w, blocks=blocks)

        backends["triton"] = (triton_run, None)
    except ImportError as exc:
        print(f"bench_layer: triton backend skipped ({exc})", file=sys.stderr)
    from kernels.megablocks_backend import UNAVAILABLE_REASON, swiglu_megablocks

    if UNAVAILABLE_REASON is None:
        backends["megablocks"] = (_gathered(swiglu_megablocks), None)
    else:
        print(f"bench_layer: megablocks backend skipped ({UNAVAILABLE_REASON})", file=sys.stderr)
    return backends


class Clock:
    """Timestamps and peak memory on one device: CUDA events and the caching allocator's peak on a
    GPU; ``time.perf_counter`` and no memory figure on the CPU (the CPU mode is a smoke run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: object, end: object) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3  # type: ignore[attr-defined, operator]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_mib(self, base: int) -> float:
        return (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else float("nan")


def time_fwd_bwd(fn: Callable[[], Tensor], params: list[Tensor], dy: Tensor, warmup: int, iters: int) -> dict[str, float]:
    """Median forward and forward+backward milliseconds and peak extra memory (MiB; NaN on CPU)."""
    clock = Clock(dy.device)
    for _ in range(warmup):
        fn().backward(dy)
    clock.sync()
    for p in params:
        p.grad = None
    base = clock.reset_peak()
    marks = []
    for _ in range(iters):
        for p in params:
            p.grad = None
        start = clock.mark()
        y = fn()
        mid = clock.mark()
        y.backward(dy)
        marks.append((start, mid, clock.mark()))
    clock.sync()
    return {
        "fwd_ms": statistics.median(clock.ms(s, m) for s, m, _ in marks),
        "fwd_bwd_ms": statistics.median(clock.ms(s, e) for s, _, e in marks),
        "peak_mib": clock.peak_mib(base),
    }


def reference_columns(T: int, K: int, D: int, F_: int, E: int, warmup: int, iters: int, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """The bmm ceiling (balanced equal groups, no routing) and the dense GEMM with the same FLOPs."""
    rows = T * K // E
    new = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, wg, wu, wd = (t.requires_grad_() for t in (new(E, rows, D), new(E, D, F_), new(E, D, F_), new(E, F_, D)))
    ceiling = lambda: torch.bmm(F.silu(torch.bmm(x, wg)) * torch.bmm(x, wu), wd)  # noqa: E731
    out = {"bmm_ceiling": time_fwd_bwd(ceiling, [x, wg, wu, wd], new(E, rows, D), warmup, iters)}
    del x, wg, wu, wd
    a, w = new(T * K, D).requires_grad_(), new(D, 3 * F_).requires_grad_()
    out["dense_gemm"] = time_fwd_bwd(lambda: a @ w, [a, w], new(T * K, 3 * F_), warmup, iters)
    return out


@dataclass
class Problem:
    """One (shape, routing) instance: identical inputs for every backend."""

    T: int
    D: int
    F: int
    E: int
    K: int
    routing: str
    x: Tensor
    w_router: Tensor
    bias: Tensor
    weights: Weights
    dy: Tensor

    @staticmethod
    def make(shape: tuple[int, int, int, int, int], routing: str, zipf_s: float, seed: int, device: torch.device, dtype: torch.dtype) -> Problem:
        D, F_, E, K, T = shape
        gen = torch.Generator().manual_seed(seed)
        ids = routing_ids(T, E, K, routing, zipf_s, gen)
        bias = torch.zeros(T, E).scatter_(1, ids, ROUTING_BIAS)
        rnd = lambda *s, std: (torch.randn(*s, generator=gen) * std).to(device, dtype)  # noqa: E731
        weights = (rnd(E, D, F_, std=D**-0.5), rnd(E, D, F_, std=D**-0.5), rnd(E, F_, D, std=F_**-0.5))
        return Problem(T, D, F_, E, K, routing, rnd(T, D, std=1.0), rnd(D, E, std=0.1 * D**-0.5), bias.to(device), weights, rnd(T, D, std=1.0))


def run_backend(p: Problem, run: ExpertRun, cf: float | None, warmup: int, iters: int) -> dict[str, float]:
    """Time the whole layer with ``run`` as the experts, then its error against fp32 on its own plan."""
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w_router, *p.weights)]
    x, w_router, *w = leaves

    def layer() -> Tensor:
        return run(x, route(x, w_router, p.bias, p.K, cf), tuple(w), p.K)

    stats = time_fwd_bwd(layer, leaves, p.dy, warmup, iters)
    from kernels import reference

    with torch.no_grad():
        plan = route(x, w_router, p.bias, p.K, cf)
        y = run(x, plan, tuple(w), p.K).float()
        y32 = reference.moe_experts(x.float(), plan.slot_idx_R, plan.weight_R, plan.counts_E, p.K, *(t.float() for t in w))
    stats["max_rel_err"] = ((y - y32).abs().max() / y32.abs().max()).item()
    stats["dropped_frac"] = (plan.num_dropped.float() / plan.num_routed.float()).item()
    return stats


def autotune(p: Problem, warmup: int, iters: int) -> tuple[object, list[dict]]:
    """Time the triton backend under each AUTOTUNE_BLOCKS config; returns the fastest and all results."""
    from kernels.layout import BlockSizes
    from kernels.moe_experts import fused_moe_experts

    results = []
    for text in AUTOTUNE_BLOCKS:
        blocks = BlockSizes.parse(text)

        def run(x_TD: Tensor, plan: DispatchPlan, w: Weights, K: int, blocks: BlockSizes = blocks) -> Tensor:
            return fused_moe_experts(x_TD, plan.slot_idx_R, plan.weight_R, plan.counts_E, K, *w, blocks=blocks)

        try:
            stats = run_backend(p, run, None, warmup, iters)
        except Exception as exc:  # out of shared memory / registers for this config
            stats = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        results.append({"blocks": asdict(blocks), **stats})
    ok = [r for r in results if "error" not in r]
    best = BlockSizes(**min(ok, key=lambda r: r["fwd_bwd_ms"])["blocks"]) if ok else None
    return best, results


def markdown(records: list[dict]) -> str:
    """One table row per (shape, routing, backend)."""
    lines = [
        "| D | F | E | K | T | routing | backend | fwd ms | fwd+bwd ms | TFLOP/s | vs dense | peak MiB | max rel err | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        head = f"| {r['D']} | {r['F']} | {r['E']} | {r['K']} | {r['T']} | {r['routing']} | {r['backend']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]} |||||||")
            continue
        err = f"{r['max_rel_err']:.2e}" if "max_rel_err" in r else "-"
        drop = f"{r['dropped_frac']:.3f}" if "dropped_frac" in r else "-"
        lines.append(
            f"{head} {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['tflops']:.1f} | {r['vs_dense']:.2f} | {r['peak_mib']:.0f} | {err} | {drop} |"
        )
    return "\n".join(lines) + "\n"


def bench(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Table records, and the autotune sweeps (empty without --autotune)."""
    records: list[dict] = []
    sweeps: list[dict] = []
    shapes = [tuple(s) for s in args.shape] if args.shape else QUICK_SHAPES if args.quick else SHAPES
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    for si, shape in enumerate(shapes):
        D, F_, E, K, T = shape
        dims = dict(D=D, F=F_, E=E, K=K, T=T)
        flops = useful_flops(T, K, D, F_)
        blocks = None
        refs = reference_columns(T, K, D, F_, E, args.warmup, args.iters, device, dtype)
        dense_ms = refs["dense_gemm"]["fwd_bwd_ms"]
        for routing in args.routing:
            p = Problem.make(shape, routing, args.zipf_s, args.seed + si, device, dtype)
            if args.autotune and routing == args.routing[0]:  # tuned once per shape, on the first routing
                blocks, tuned = autotune(p, args.warmup, args.iters)
                sweeps.append({**dims, "routing": routing, "results": tuned})
            backends = build_backends(blocks)
            rows = [(name, refs[name]) for name in ("bmm_ceiling", "dense_gemm")]
            for name in args.backends or list(backends):
                if name not in backends:
                    continue
                run, cf = backends[name]
                try:
                    rows.append((name, run_backend(p, run, cf, args.warmup, args.iters)))
                except Exception as exc:  # one backend failing (OOM, unsupported) must not stop the others
                    rows.append((name, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}))
                _free(device)
            for name, stats in rows:
                rec = {**dims, "routing": routing, "backend": name, **stats}
                if "error" not in stats:
                    rec["tflops"] = flops / (stats["fwd_bwd_ms"] * 1e-3) / 1e12
                    rec["vs_dense"] = dense_ms / stats["fwd_bwd_ms"]
                if name == "triton" and blocks is not None:
                    rec["blocks"] = asdict(blocks)
                records.append(rec)
                print(json.dumps(rec, default=str)[:300], flush=True)
            del p
            _free(device)
    return records, sweeps


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(records: list[dict]) -> str:
    """Per (shape, routing): triton's speedup over grouped_mm and its time against the bmm ceiling,
    with the kernel issue's targets (>= 1.15x grouped_mm; stretch: at or above the ceiling)."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "error" not in r:
            by.setdefault((r["D"], r["F"], r["E"], r["K"], r["T"], r["routing"]), {})[r["backend"]] = r
    lines = [
        "| D | F | E | K | T | routing | triton / grouped_mm speedup | >= 1.15x | ceiling / triton time | >= ceiling | triton vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in by.items():
        if "triton" not in rows:
            continue
        ms = rows["triton"]["fwd_bwd_ms"]
        speed = rows["grouped_mm"]["fwd_bwd_ms"] / ms if "grouped_mm" in rows else float("nan")
        ceil = rows["bmm_ceiling"]["fwd_bwd_ms"] / ms if "bmm_ceiling" in rows else float("nan")
        lines.append(
            "| " + " | ".join(map(str, key)) + f" | {speed:.2f}x | {'yes' if speed >= 1.15 else 'no'} | {ceil:.2f} | {'yes' if ceil >= 1.0 else 'no'} | {rows['triton']['vs_dense']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_layer", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES} instead of {SHAPES}")
    parser.add_argument("--shape", type=int, nargs=5, action="append", metavar=("D", "F", "E", "K", "T"), help="repeatable; replaces the shape list")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the whole bench (triton needs TRITON_INTERPRET=1); its times mean nothing")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="bf16 is the benchmark; fp32 for CPU smoke runs")
    parser.add_argument("--autotune", action="store_true", help="sweep the Triton block sizes per shape (on the first --routing); the fastest is used for every routing")
    parser.add_argument("--routing", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    parser.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent of expert popularity")
    parser.add_argument("--backends", nargs="*", default=None, help="subset of torch capacity_bmm grouped_mm triton megablocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_layer: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured", file=sys.stderr)
        return 1
    if args.device == "cpu":
        print("bench_layer: CPU smoke run: checks the whole bench runs; its times are not GPU numbers", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    records, sweeps = bench(args)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run, not a benchmark)"
    meta = {
        "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - start,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "records": records, "autotune": sweeps}, indent=1, default=str))
    title = f"# MoE layer benchmark ({meta['device']}, {args.dtype}, fwd+bwd)\n\n"
    (args.out / "results.md").write_text(title + markdown(records) + "\n## Targets\n\n" + summary(records))
    print(f"bench_layer: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
