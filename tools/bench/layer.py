"""Benchmark one MoE layer (router + dispatch + experts + combine), forward+backward in bf16, on one GPU.

Usage:
    python -m tools.bench.layer --out bench_out            # the four reference shapes
    python -m tools.bench.layer --quick --out bench_out    # small shapes, a smoke run
    python -m tools.bench.layer --autotune --out bench_out # also sweep the Triton block sizes
    TRITON_INTERPRET=1 python -m tools.bench.layer --device cpu --dtype fp32 --shape 32 64 4 2 64 --autotune
        # a CPU smoke run of the whole bench (tests run it; its times mean nothing)

Shape legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, R routed rows.

Every row gets the same seed, input, weights and routing: the router's logits get a fixed +8
bias on a routing drawn once per (shape, routing) - balanced (exactly T*K/E rows per expert) or
Zipf-skewed (expert popularity proportional to 1/rank^s) - so top-k picks the same experts for
all. Rows:

- ``layer:<backend>``: the whole ``moe.layer.MoELayer`` as a user builds it (router ``topk`` with
  its balance and z losses, dispatch, experts, combine, routing statistics), one per fast backend;
- ``plain_grouped_mm``: an independent plain MoE layer on ``torch._grouped_mm`` (softmax top-k,
  sort, three grouped GEMMs, ``index_add`` combine: the torchtitan pattern), the baseline a
  moeforge layer must never be slower than;
- ``<backend>``: the experts path alone (``ExpertBackend.run_plan`` on a dispatch plan from a
  minimal router): ``grouped_mm``, ``triton``, and on request ``torch``, ``capacity_bmm``
  (GShard-style capacity 1.25, padded [E, C, D] buffers through torch.bmm) and ``megablocks``;
- ``bmm_ceiling`` (the same SwiGLU FLOPs through torch.bmm on balanced equal groups, no routing)
  and ``dense_gemm`` (one bf16 GEMM [T*K, D] x [D, 3F] forward+backward: the same 18*T*K*D*F
  useful FLOPs).

Times are CUDA-event medians after warm-up; TFLOP/s counts the useful 18*T*K*D*F; ``vs_dense`` =
dense GEMM time / row time; peak memory is above what was allocated before the timed loop; the
error is max |y - y_fp32| / max |y_fp32| against the fp32 reference on the row's own plan.
Writes ``results.json`` and ``results.md`` to ``--out``; the markdown ends with the targets per
(shape, routing): each whole layer against the bmm ceiling and the plain layer (time and peak
memory), beside the time ``tools.bench.layer_budget`` predicts for the grouped_mm layer.
``--autotune`` times every ``AUTOTUNE_BLOCKS`` configuration of the triton experts path on the
first routing of each shape and uses the fastest for all routings of that shape.
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

from moe.dispatch import DispatchPlan, capacity, combine, dispatch, gather_rows
from moe.expert_backends import BACKENDS, ExpertOptions
from moe.routers.interface import RoutingDecision
from tools.bench.shapes import QUICK_SHAPES, REFERENCE_SHAPES as SHAPES

ROUTING_BIAS = 8.0
CAPACITY_FACTOR = 1.25
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FAST_BACKENDS = ("grouped_mm", "triton")
EXPERT_ROWS = ("torch", "capacity_bmm", "grouped_mm", "triton", "megablocks")
AUTOTUNE_BLOCKS = [  # "bm,bn,bk,warps,stages,br,bwd_bn" (kernels.layout.BlockSizes.parse; experts.kernel_blocks)
    # Each compiles for sm_90 with no register spills and >= 8 resident warps per SM in every
    # GEMM kernel at the four reference shapes (python -m tools.bench.compile_check --blocks ...);
    # 128,256 tiles spill in swiglu_fwd and grouped_wgrad and 128,64 with 4 warps in swiglu_bwd.
    "128,128,64,8,3,64,64", "128,128,64,8,4,64,64", "128,128,32,8,4,32,64", "128,64,64,8,4,64,64",
    "64,128,64,8,3,64,64", "64,64,64,4,4,64,64", "64,128,32,4,4,32,32",
]

Weights = tuple[Tensor, Tensor, Tensor]
ExpertRun = Callable[[Tensor, DispatchPlan, Weights, int], Tensor]
Step = Callable[[], "Tensor | tuple[Tensor, Tensor]"]


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


def plain_grouped_mm_layer(x_TD: Tensor, w_router_DE: Tensor, bias_TE: Tensor, w: Weights, K: int) -> tuple[Tensor, Tensor]:
    """An independent, plain MoE layer on ``torch._grouped_mm`` (the torchtitan pattern): the baseline.

    Softmax top-k router (logits from a GEMM in the activations' dtype), Switch balance loss,
    a stable sort of the slots, three grouped GEMMs with autograd through them, and the
    weighted combine by ``index_add`` in fp32. Returns (y_TD, aux loss).
    """
    T, E = bias_TE.shape
    probs_TE = torch.softmax((x_TD @ w_router_DE).float() + bias_TE, dim=-1)
    weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    counts_E = torch.histc(ids_TK.float(), bins=E, min=0, max=E - 1)
    aux = E * (counts_E / (T * K) * probs_TE.mean(0)).sum()
    order_S = ids_TK.reshape(-1).argsort(stable=True)
    token_S = order_S // K
    offs_E = counts_E.cumsum(0).to(torch.int32)
    x_SD = x_TD[token_S]
    h_SF = F.silu(torch._grouped_mm(x_SD, w[0], offs=offs_E)) * torch._grouped_mm(x_SD, w[1], offs=offs_E)
    y_SD = torch._grouped_mm(h_SF, w[2], offs=offs_E).float() * weights_TK.reshape(-1)[order_S, None]
    y_TD = torch.zeros(T, x_TD.shape[1], dtype=torch.float32, device=x_TD.device).index_add(0, token_S, y_SD)
    return y_TD.to(x_TD.dtype), aux


def expert_runs(blocks: object | None) -> dict[str, tuple[ExpertRun, float | None]]:
    """name -> (experts path on a plan, capacity factor); backends that cannot run here are left out with a note."""
    runs: dict[str, tuple[ExpertRun, float | None]] = {"capacity_bmm": (capacity_bmm, CAPACITY_FACTOR)}
    options = ExpertOptions(blocks=blocks)  # type: ignore[arg-type]
    for name, backend in BACKENDS.items():
        if name == "auto":  # a choice between the others, not a row of its own
            continue
        reason = backend.unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if reason is not None:
            print(f"bench_layer: {name} skipped ({reason})", file=sys.stderr)
            continue

        def run(x_TD: Tensor, plan: DispatchPlan, w: Weights, K: int, backend=backend) -> Tensor:
            return backend.run_plan(x_TD, plan, *w, options)

        runs[name] = (run, None)
    return runs


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


def _backward(out: Tensor | tuple[Tensor, Tensor], dy: Tensor) -> None:
    """Backward of a step's output: ``y`` with ``dy``, plus a scalar auxiliary loss when there is one."""
    if isinstance(out, tuple):
        y, aux = out
        torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
    else:
        out.backward(dy)


def time_fwd_bwd(fn: Step, params: list[Tensor], dy: Tensor, warmup: int, iters: int) -> dict[str, float]:
    """Median forward and forward+backward milliseconds and peak extra memory (MiB; NaN on CPU)."""
    clock = Clock(dy.device)
    for _ in range(warmup):
        _backward(fn(), dy)
    clock.sync()
    for p in params:
        p.grad = None
    base = clock.reset_peak()
    marks = []
    for _ in range(iters):
        for p in params:
            p.grad = None
        start = clock.mark()
        out = fn()
        mid = clock.mark()
        _backward(out, dy)
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
    """One (shape, routing) instance: identical inputs for every row."""

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
        dev_gen = torch.Generator(device).manual_seed(seed)  # large tensors are drawn on the device (seconds saved per shape)
        rnd = lambda *s, std: (torch.randn(*s, generator=dev_gen, device=device) * std).to(dtype)  # noqa: E731
        weights = (rnd(E, D, F_, std=D**-0.5), rnd(E, D, F_, std=D**-0.5), rnd(E, F_, D, std=F_**-0.5))
        return Problem(T, D, F_, E, K, routing, rnd(T, D, std=1.0), rnd(D, E, std=0.1 * D**-0.5), bias.to(device), weights, rnd(T, D, std=1.0))


def _error(p: Problem, y: Tensor, plan: DispatchPlan, w: Weights) -> dict[str, float]:
    """max |y - y_fp32| / max |y_fp32| on ``plan``, and the dropped fraction."""
    from kernels import reference

    y32 = reference.moe_experts(p.x.float(), plan.slot_idx_R, plan.weight_R, plan.counts_E, p.K, *(t.float() for t in w))
    return {
        "max_rel_err": ((y.float() - y32).abs().max() / y32.abs().max()).item(),
        "dropped_frac": float(plan.num_dropped) / float(plan.num_routed),
    }


def run_experts(p: Problem, run: ExpertRun, cf: float | None, warmup: int, iters: int) -> dict[str, float]:
    """Time router + dispatch + ``run`` as the experts, then its error against fp32 on its own plan."""
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w_router, *p.weights)]
    x, w_router, *w = leaves
    stats = time_fwd_bwd(lambda: run(x, route(x, w_router, p.bias, p.K, cf), tuple(w), p.K), leaves, p.dy, warmup, iters)
    with torch.no_grad():
        plan = route(x, w_router, p.bias, p.K, cf)
        stats.update(_error(p, run(x, plan, tuple(w), p.K), plan, tuple(w)))
    return stats


def run_plain(p: Problem, warmup: int, iters: int) -> dict[str, float]:
    """Time the plain grouped_mm layer (router included), then its error on the plan its routing makes."""
    leaves = [t.clone().requires_grad_() for t in (p.x, p.w_router, *p.weights)]
    x, w_router, *w = leaves
    stats = time_fwd_bwd(lambda: plain_grouped_mm_layer(x, w_router, p.bias, tuple(w), p.K), leaves, p.dy, warmup, iters)
    with torch.no_grad():
        y, _ = plain_grouped_mm_layer(x, w_router, p.bias, tuple(w), p.K)
        stats.update(_error(p, y, route(x, w_router, p.bias, p.K, None), tuple(w)))
    return stats


def build_layer(p: Problem, backend: str) -> torch.nn.Module:
    """``MoELayer`` (router topk with its default losses, statistics on) holding the problem's
    weights, its router logits shifted by the routing bias, resolved for the problem's device."""
    from moe.experts import ExpertsConfig
    from moe.layer import MoELayer
    from moe.routers.topk import TopKConfig

    layer = MoELayer(p.D, p.F, p.E, TopKConfig(k=p.K), ExpertsConfig(backend=backend)).to(p.x.device, p.x.dtype)
    with torch.no_grad():
        layer.router.gate.weight.copy_(p.w_router.t())
        for param, w in zip((layer.experts.w_gate_EDF, layer.experts.w_up_EDF, layer.experts.w_down_EFD), p.weights):
            param.copy_(w)
    unbiased = layer.router.logits
    layer.router.logits = lambda x_TD: unbiased(x_TD) + p.bias  # the bench's forced routing
    layer.train()
    layer.resolve_backend(p.x.device)
    return layer


def run_layer(p: Problem, backend: str, warmup: int, iters: int) -> dict[str, float]:
    """Time the whole MoELayer with ``backend``, then its error against fp32 on its own plan."""
    from moe.routers import RouterContext

    layer = build_layer(p, backend)
    x = p.x.clone().requires_grad_()
    ctx = RouterContext()

    def step() -> tuple[Tensor, Tensor]:
        y, aux = layer(x, ctx)
        return y, sum(aux.values())

    stats = time_fwd_bwd(step, [x, *layer.parameters()], p.dy, warmup, iters)
    with torch.no_grad():
        plan = dispatch(layer.router(x, ctx), p.E, None)
        stats.update(_error(p, layer(x, ctx)[0], plan, p.weights))
    return stats


def autotune(p: Problem, warmup: int, iters: int) -> tuple[object, list[dict]]:
    """Time the triton experts path under each AUTOTUNE_BLOCKS config; returns the fastest and all results."""
    from kernels.layout import BlockSizes

    results = []
    for text in AUTOTUNE_BLOCKS:
        blocks = BlockSizes.parse(text)
        options = ExpertOptions(blocks=blocks)

        def run(x_TD: Tensor, plan: DispatchPlan, w: Weights, K: int, options: ExpertOptions = options) -> Tensor:
            return BACKENDS["triton"].run_plan(x_TD, plan, *w, options)

        try:
            stats = run_experts(p, run, None, warmup, iters)
        except Exception as exc:  # out of shared memory / registers for this config
            stats = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        results.append({"blocks": asdict(blocks), **stats})
    ok = [r for r in results if "error" not in r]
    best = BlockSizes(**min(ok, key=lambda r: r["fwd_bwd_ms"])["blocks"]) if ok else None
    return best, results


def markdown(records: list[dict]) -> str:
    """One table row per (shape, routing, row)."""
    lines = [
        "| D | F | E | K | T | routing | row | fwd ms | fwd+bwd ms | TFLOP/s | vs dense | peak MiB | max rel err | dropped |",
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
            runs = expert_runs(blocks)
            jobs: list[tuple[str, Callable[[], dict[str, float]]]] = [(f"layer:{b}", lambda b=b: run_layer(p, b, args.warmup, args.iters)) for b in args.layers]
            jobs.append(("plain_grouped_mm", lambda: run_plain(p, args.warmup, args.iters)))
            jobs += [(name, lambda name=name: run_experts(p, *runs[name], args.warmup, args.iters)) for name in args.backends if name in runs]
            rows = [(name, refs[name]) for name in ("bmm_ceiling", "dense_gemm")]
            for name, job in jobs:
                try:
                    rows.append((name, job()))
                except Exception as exc:  # one row failing (OOM, unsupported) must not stop the others
                    rows.append((name, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}))
                _free(device)
            for name, stats in rows:
                rec = {**dims, "routing": routing, "backend": name, **stats}
                if "error" not in stats:
                    rec["tflops"] = flops / (stats["fwd_bwd_ms"] * 1e-3) / 1e12
                    rec["vs_dense"] = dense_ms / stats["fwd_bwd_ms"]
                if blocks is not None and name in BACKENDS and "kernel_blocks" in BACKENDS[name].honours:
                    rec["blocks"] = asdict(blocks)
                records.append(rec)
                print(json.dumps(rec, default=str)[:300], flush=True)
            del p
            _free(device)
    return records, sweeps


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def predicted_ms(shape: tuple[int, int, int, int, int]) -> float:
    """The grouped_mm layer's time from its counted budget (``tools.bench.layer_budget``), NaN if it cannot be counted."""
    try:
        from tools.bench.layer_budget import count_layer_step

        return count_layer_step(shape).predicted_ms()
    except Exception:  # noqa: BLE001 - a prediction is a nicety beside a measurement
        return float("nan")


def summary(records: list[dict]) -> str:
    """Per (shape, routing) and whole layer: time against the bmm ceiling and the plain grouped_mm
    layer, peak memory against the plain layer's, and the grouped_mm layer's budget prediction."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "error" not in r:
            by.setdefault((r["D"], r["F"], r["E"], r["K"], r["T"], r["routing"]), {})[r["backend"]] = r
    lines = [
        "| D | F | E | K | T | routing | layer | ms | ceiling ms | plain ms | predicted ms | >= ceiling | >= plain | peak MiB / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    predictions: dict[tuple, float] = {}
    for key, rows in by.items():
        ceil = rows.get("bmm_ceiling", {}).get("fwd_bwd_ms", float("nan"))
        plain = rows.get("plain_grouped_mm", {})
        for name in sorted(n for n in rows if n.startswith("layer:")):
            r = rows[name]
            ms = r["fwd_bwd_ms"]
            pred = predictions.setdefault(key[:5], predicted_ms(key[:5])) if name == "layer:grouped_mm" else float("nan")
            plain_ms = plain.get("fwd_bwd_ms", float("nan"))
            mem = r["peak_mib"] / plain["peak_mib"] if plain.get("peak_mib") else float("nan")
            lines.append(
                "| " + " | ".join(map(str, key)) + f" | {name.removeprefix('layer:')} | {ms:.2f} | {ceil:.2f} | {plain_ms:.2f} | {pred:.2f} | "
                f"{'yes' if ms <= ceil else 'no'} | {'yes' if ms <= plain_ms else 'no'} | {mem:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.layer", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES} instead of {SHAPES}")
    parser.add_argument("--shape", type=int, nargs=5, action="append", metavar=("D", "F", "E", "K", "T"), help="repeatable; replaces the shape list")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the whole bench (triton needs TRITON_INTERPRET=1); its times mean nothing")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="bf16 is the benchmark; fp32 for CPU smoke runs")
    parser.add_argument("--autotune", action="store_true", help="sweep the Triton block sizes per shape (on the first --routing); the fastest is used for every routing")
    parser.add_argument("--routing", nargs="+", default=["balanced", "zipf"], choices=["balanced", "zipf"])
    parser.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent of expert popularity")
    parser.add_argument("--layers", nargs="*", default=list(FAST_BACKENDS), help="backends timed as whole MoELayer rows")
    parser.add_argument("--backends", nargs="*", default=list(FAST_BACKENDS), help=f"experts-path rows, from {' '.join(EXPERT_ROWS)}")
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
