"""What one whole training step of a configured job costs a GPU, and its predicted time, tokens/s and MFU.

Usage (Hydra overrides as ``python -m launch.train`` takes them)::

    python -m tools.bench.step_budget model=olmoe_1b_7b model.num_layers=4 train.batch_size=8 train.seq_len=2048
    python -m tools.bench.step_budget model=moe_125m train.batch_size=8 train.seq_len=2048 --card h100 --json

The job is composed exactly as ``launch.train`` composes it, its model, engine and optimizer are
built by the trainer's own code on ``meta`` tensors (any preset fits at full size), and one
optimizer step runs as the training loop runs it: zero_grad, ``launch.train_step.forward_backward``
(forward, loss, backward over ``train.grad_accum`` micro-batches), the engine's gradient
reduction and clipping, the step guard, the optimizer step, and the per-step bookkeeping.
``tools.bench.meta_cuda.on_card`` makes that run take the card's code paths (bf16 autocast, the
attention kernel, the foreach/fused optimizer, ``experts.backend=auto``'s choice), and
``tools.bench.op_counter.OpCounter`` counts every operator: GEMM and attention FLOPs, non-GEMM bytes,
launches and host syncs, each labelled with the component it belongs to (by phase and module
path, ``component_of``), plus live memory by category.

Time: each GEMM at the card's dense or grouped GEMM rate, attention at FlashAttention-2's rate,
every other op at the card's measured glue bandwidth (``tools.bench.card_rates``; each rate names its
source). The step's time comes from an issue-queue simulation (``predict``): the host issues the
ops in order at ``launch_us`` per launch (``issue_queue``), the GPU runs each as soon as it is
issued and the GPU is free, and a host sync makes the host wait for the GPU to drain. Without host
syncs the host runs ahead, into the next step too, and the GPU idles only where the host falls
behind (a stretch of many small ops); that idle time is the exposed host time, put on the
component whose op waited. A few steps run back to back and the last one's time is the
prediction (a steady state; the launch queue's depth, which caps how far ahead the host can get,
is not modelled). With ``train.cuda_graphs=true`` a captured step replays without per-launch
host work, so its step is the GPU's time; ``train.compile=true`` is counted as the eager step
(what inductor would fuse is not predicted).
MFU = the model FLOPs of ``launch/throughput.py`` (6 N_active + 12 L H Q S per token; attention
over the full S x S square, as PaLM counts it) / step time / the card's dense bf16 peak.
Without activation recomputation the counted GEMM + attention FLOPs equal that formula (tests
check every preset within 1%); with it, the counted ("executed") FLOPs are higher and MFU stays
on the formula's count.

Memory: parameters and optimizer state exist before the step; every storage an op creates is
tracked until freed, as activations (forward), gradients and backward buffers (backward), or
optimizer temporaries; the peak and its split are reported, and each component's own high-water
mark above what was live when it started (``loss_peak_gb`` for the head and loss).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.module_tracker import ModuleTracker

from launch.profiling import CLASSES
from tools.bench.card_rates import CARDS, Card
from tools.bench.op_counter import Budget, MemoryTracker, OpCounter, OpRecord, tensors_in

COMPONENTS = ("embedding", "attention projections", "attention (SDPA)", "MoE layers", "norms and RoPE", "head and loss",
              "grad clip", "optimizer", "other")
"""Components of a step, in report order. ``MoE layers`` holds every FFN (dense ones too);
``norms and RoPE`` also holds attention's own reshapes and copies; ``other`` holds residual adds,
the model's top-level glue (RoPE tables, auxiliary-loss sums) and the step's bookkeeping."""

_PHASE_COMPONENT = {"clip": "grad clip", "optimizer": "optimizer", "bookkeeping": "other"}


def component_of(where: str, kind: str) -> str:
    """The component of an op from its label ``phase:module path`` and its kind."""
    phase, _, path = where.partition(":")
    if phase in _PHASE_COMPONENT:
        return _PHASE_COMPONENT[phase]
    parts = path.split(".")[1:]  # the first name is the model's class
    if not path or path == "Global":
        return "head and loss"  # the loss, outside the model
    if "embed" in parts:
        return "embedding"
    if "head" in parts:
        return "head and loss"
    if any(p.endswith("norm") for p in parts):
        return "norms and RoPE"
    if "attn" in parts:
        return {"sdpa": "attention (SDPA)", "gemm": "attention projections"}.get(kind, "norms and RoPE")
    if "ffn" in parts:
        return "MoE layers"
    return "other"


class _GradFnLabels(TorchFunctionMode):
    """Labels every autograd node a forward creates with the module path it ran in, so the
    backward's ops (run by ``torch._C._current_autograd_node()``) are put where their forward was.
    Nodes created inside one torch function (a composite's intermediates) take its label too."""

    def __init__(self, label: Any) -> None:
        super().__init__()
        self.label = label

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            if t.grad_fn is not None:
                self._mark(t.grad_fn, self.label())
        return out

    @staticmethod
    def _mark(node: Any, label: str) -> None:
        todo = [node]
        while todo:
            n = todo.pop()
            if n is None or "where" in n.metadata:
                continue
            n.metadata["where"] = label
            todo.extend(f for f, _ in n.next_functions)


def backward_label() -> str | None:
    """The forward label of the autograd node running now (None outside a backward)."""
    node = torch._C._current_autograd_node()
    return None if node is None else node.metadata.get("where")


@dataclass
class StepCount:
    """One counted optimizer step of a job."""

    budget: Budget
    components: list[str]
    """``component_of`` of each op in ``budget.ops``."""
    memory_at_peak: dict[str, int]
    peak_bytes: int
    component_peak: dict[str, int]
    phase_peaks: dict[str, dict[str, int]]
    """Each phase's (forward and backward, clip, optimizer, bookkeeping) own peak, split by category."""
    tokens: int
    formula_flops: float
    """launch/throughput.py's model FLOPs of the step's tokens."""
    backend: str
    card: Card
    settings: dict[str, Any] = field(default_factory=dict)


def compose_job(overrides: list[str]) -> Any:
    """The ``JobConfig`` ``python -m launch.train <overrides>`` would run (validated)."""
    from hydra import compose, initialize_config_dir

    from launch.config import conf_dir
    from launch.job import register_schemas, to_job_config
    from launch.run_dir import register_resolvers

    register_resolvers()
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "logging=none", "checkpoint.dir=unused"])
    return to_job_config(cfg)


def _backend_on(card: Card, job: Any) -> str:
    """``experts.backend`` as resolved on ``card`` (``auto`` asks ``moe.expert_backends.auto``)."""
    if job.experts.backend != "auto":
        return job.experts.backend
    from moe.expert_backends.auto import choice_for

    return choice_for(card.device_name, card.capability, job.model.num_experts, triton_ok=True).backend


def count_step(overrides: list[str], card: str = "h200") -> StepCount:
    """Count one optimizer step of the job ``overrides`` describe, as it would run on ``card``.

    Python's cyclic garbage collector is off while the step is counted (after one collection), so
    the memory count does not depend on when it happens to run: tensors kept alive only by a
    reference cycle are counted until the step ends. Without this, the peak of one configuration
    varied between runs by up to 3.5 GB (78.8 to 82.5 GB for mixtral_8x7b on 64 H100s)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _count_step(overrides, card)
    finally:
        if was_enabled:
            gc.enable()


def _count_step(overrides: list[str], card: str) -> StepCount:
    import dataclasses

    from launch.engines import build_engine
    from launch.log_window import LogWindow
    from launch.preemption import AgentWatch, StopSignals
    from launch.step_guard import StepGuard
    from launch.throughput import count_model
    from launch.job import manifest_of
    from launch.train import precision_of
    from launch.train_step import doc_ids, forward_backward
    from moe.model import MoETransformer
    from parallel import Runtime
    from parallel.modes import parallel_mode
    from tools.bench.meta_cuda import CudaAutocast, on_card

    rates = CARDS[card]
    job = compose_job(overrides)
    meta = torch.device("meta")
    with on_card(rates.device_name, rates.capability):
        backend = _backend_on(rates, job)
        job = dataclasses.replace(job, experts=dataclasses.replace(job.experts, backend=backend))
        torch.manual_seed(0)
        with meta:
            core = MoETransformer(job.model, job.router, job.experts)
        tr = job.train
        counts = count_model(core, tr.seq_len)
        core.prepare(meta)
        core.set_activation_checkpointing(tr.activation_checkpointing)
        core.set_fp32_residual(tr.fp32_residual)
        runtime = Runtime(device=meta, cfg=job.parallel, replicated=parallel_mode(job.parallel.mode).replicates_parameters)
        engine = build_engine(job, core, runtime, manifest_of(job))
        model = engine.model
        guard = StepGuard(runtime, tr.on_nonfinite, tr.max_consecutive_skips, StopSignals([]), AgentWatch())
        window = LogWindow(runtime)
        precision = precision_of(job, torch.device("cuda"))
        amp = CudaAutocast(torch.bfloat16)
        autocast = amp.region() if precision == "bf16" else contextlib.nullcontext()

        memory = MemoryTracker()
        for p in model.parameters():
            memory.track(p, "parameters")
        for state in engine.optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                    memory.track(t, "optimizer state")
        for master in getattr(engine.optimizer, "masters", {}).values():  # optim.master_weights: fp32 masters of bf16 weights
            memory.track(master, "optimizer state")
        memory.peak = memory.total
        memory.at_peak = dict(memory.live)
        memory.phase = "forward and backward"

        phase = ["step"]
        tracker = ModuleTracker()

        root = type(model).__name__
        after_norm = [False]  # the model's own ops after its final norm are the output head (and the loss)

        def forward_label() -> str:
            deepest = max(tracker.parents, key=lambda n: n.count("."))
            return f"{root}.head" if deepest == root and after_norm[0] else deepest

        last_backward = ["Global"]

        def where() -> str:
            if phase[0] != "step":
                return f"{phase[0]}:"
            node = torch._C._current_autograd_node()
            if node is None:
                return f"fwd:{forward_label()}"
            last_backward[0] = node.metadata.get("where", last_backward[0])  # AccumulateGrad & co: the node before
            return f"bwd:{last_backward[0]}"

        def category() -> str:
            if phase[0] == "step":
                return "gradients and backward buffers" if torch._C._current_autograd_node() is not None else "activations"
            return f"{phase[0]} temporaries"

        x = torch.zeros(tr.batch_size, tr.seq_len, dtype=torch.long, device=meta)
        y = torch.zeros_like(x)
        counter = OpCounter(where, memory, category)
        names = {id(m): f"{root}.{n}" if n else root for n, m in model.named_modules()}

        def label_outputs(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            # nodes a module's forward made that no torch function call labelled (custom autograd Functions)
            label = forward_label() if module is model else names.get(id(module))
            for t in tensors_in(output):
                if t.grad_fn is not None and label is not None:
                    _GradFnLabels._mark(t.grad_fn, label)
            if module is core.norm:
                after_norm[0] = True

        def new_forward(module: torch.nn.Module, _inputs: Any) -> None:
            if module is model:
                after_norm[0] = False

        hook = torch.nn.modules.module.register_module_forward_hook(label_outputs)
        pre_hook = torch.nn.modules.module.register_module_forward_pre_hook(new_forward)
        with amp, tracker, _GradFnLabels(forward_label), counter:
            engine.zero_grad()
            ce, aux = forward_backward(engine, runtime, x, y, 0, job, autocast)
            loss = ce + sum(aux.values(), torch.zeros((), device=meta))
            phase[0] = memory.phase = "clip"
            grad_norm = engine.grad_norm()
            phase[0] = memory.phase = "bookkeeping"
            ok = guard.post(0, loss, grad_norm)  # the trainer's step (launch/train_step.py): verdict on the device
            guard.host()
            phase[0] = memory.phase = "optimizer"
            engine.step(ok)
            phase[0] = memory.phase = "bookkeeping"
            runtime.after_optimizer_step(model, engine.optimizer, 0)
            runtime.all_reduce_sum_(core.router_step_sums())
            core.after_step(0)
            window.add(ce, x.numel())
        hook.remove()
        pre_hook.remove()
        del doc_ids
    ops = counter.budget.ops
    comps = [component_of(r.where, r.kind) for r in ops]
    return StepCount(counter.budget, comps, memory.at_peak, memory.peak, _component_peaks(ops, comps), memory.phase_peaks, x.numel(),
                     counts.flops_per_token * x.numel(), backend, rates,
                     {"precision": precision, "activation_checkpointing": tr.activation_checkpointing, "grad_accum": tr.grad_accum,
                      "cuda_graphs": bool(getattr(tr, "cuda_graphs", False)), "compile": bool(tr.compile)})


def _component_peaks(ops: list[OpRecord], comps: list[str]) -> dict[str, int]:
    """Each component's high-water mark of live bytes above what was live when its run of ops began."""
    peaks: dict[str, int] = {}
    base, current = 0, None
    previous_live = ops[0].live_bytes if ops else 0
    for r, c in zip(ops, comps):
        if c != current:
            current, base = c, previous_live
        peaks[c] = max(peaks.get(c, 0), r.live_bytes - base)
        previous_live = r.live_bytes
    return peaks


@dataclass
class Prediction:
    step_ms: float
    gpu_ms: float
    host_ms: float
    """The GPU's idle time waiting for the host (``step_ms - gpu_ms``)."""
    host_issue_ms: float
    """The host's time to issue every launch of the step (``launches x launch_us``)."""
    tokens_per_s: float
    mfu: float
    per_component: dict[str, dict[str, float]]
    per_class: dict[str, float] = field(default_factory=dict)
    """GPU ms of each ``launch.profiling.CLASSES`` class (host idle time apart), for comparison with a profiled run."""


def op_ms(r: OpRecord, card: Card) -> float:
    """GPU time of one op at ``card``'s rates (launch gaps apart)."""
    if r.kind == "gemm":
        rate = card.grouped_gemm_tflops if r.name == "_grouped_mm" else card.dense_gemm_tflops
        return r.flops / (rate * 1e12) * 1e3
    if r.kind == "sdpa":
        return r.flops / (card.attention_tflops * 1e12) * 1e3
    return r.bytes / (card.glue_tbps * 1e12) * 1e3


STEADY_STEPS = 3
"""Steps ``predict`` queues back to back; the last one's time is the prediction (by the third the
host's lead over the GPU has settled for the configs measured: the period changes by < 0.1%)."""


def issue_queue(ops: list[tuple[float, int, bool]], launch_ms: float, steps: int = 1) -> tuple[float, list[float]]:
    """Simulate the host issuing ``ops`` (``(gpu_ms, launches, host_sync)`` each, in program order)
    to a GPU that runs them in order, ``steps`` times back to back: ``(time of the last step, the
    GPU's idle ms before each of its ops)``.

    Launch ``j`` is issued at ``h_j = h_{j-1} + launch_ms``; the GPU starts it at
    ``max(end_{j-1}, h_j)`` and ends it ``gpu_ms / launches`` later. After a host sync the host
    waits for the GPU to drain (``h = max(h, end)``). Host and GPU start idle at 0; a step's time
    is from the end of the previous step's last launch (0 for the first) to the end of its own.
    Without host syncs the host can start the next step while the GPU still works on this one, so
    over a few steps the time settles near ``max(gpu, launches x launch_ms)``.
    """
    host = end = 0.0
    idle: list[float] = []
    step_start = 0.0
    for _ in range(steps):
        step_start, idle = end, []
        for gpu_ms, launches, sync in ops:
            waited = 0.0
            for _ in range(launches):
                host += launch_ms
                start = max(end, host)
                waited += start - end
                end = start + gpu_ms / launches
            idle.append(waited)
            if sync:
                host = max(host, end)
    return end - step_start, idle


def predict(count: StepCount, card: Card | None = None) -> Prediction:
    """Step time from the issue-queue simulation of the counted ops (``issue_queue``); tokens/s; MFU.

    Each launch costs the host ``card.launch_us``; the GPU runs each op as soon as it is issued and
    the previous one is done; a host sync makes the host wait for the GPU. ``STEADY_STEPS`` steps
    run back to back (the training loop's steps between two logging steps) and the last one's time
    is the step's. The GPU's idle time before an op is exposed host time and goes to that op's
    component. With ``train.cuda_graphs=true`` a captured step replays without per-launch host
    work (no idle time: the step is the GPU's time).
    """
    card = card or count.card
    launch_ms = 0.0 if count.settings.get("cuda_graphs") else card.launch_us / 1e3
    per: dict[str, dict[str, float]] = {c: {"gemm_tflop": 0.0, "model_tflop": 0.0, "glue_gb": 0.0, "launches": 0, "host_syncs": 0,
                                            "gpu_ms": 0.0, "host_ms": 0.0} for c in COMPONENTS}
    times = [op_ms(r, card) for r in count.budget.ops]
    step, idle = issue_queue([(ms, r.launches, r.host_sync) for ms, r in zip(times, count.budget.ops)], launch_ms, STEADY_STEPS)
    for r, c, ms, waited in zip(count.budget.ops, count.components, times, idle):
        row = per[c]
        row["gemm_tflop"] += r.flops / 1e12 if r.kind != "glue" else 0.0
        row["model_tflop"] += r.model_flops / 1e12
        row["glue_gb"] += r.bytes / 1e9
        row["launches"] += r.launches
        row["host_syncs"] += int(r.host_sync)
        row["gpu_ms"] += ms
        row["host_ms"] += waited
    gpu = sum(times)
    classes = dict.fromkeys(CLASSES, 0.0)
    for r, c, ms in zip(count.budget.ops, count.components, times):
        classes[class_of_op(r, c)] += ms
    for row in per.values():
        row["ms"] = row["gpu_ms"] + row["host_ms"]
        row["share"] = row["ms"] / step if step else 0.0
        row["peak_gb"] = 0.0
    for c, b in count.component_peak.items():
        per[c]["peak_gb"] = b / 1e9
    mfu = count.formula_flops / (step / 1e3) / (card.peak_bf16_tflops * 1e12)
    return Prediction(step, gpu, max(0.0, step - gpu), count.budget.launches * launch_ms, count.tokens / (step / 1e3), mfu, per, classes)


def class_of_op(r: OpRecord, component: str) -> str:
    """The ``launch.profiling.CLASSES`` entry of a counted op, so a profiled run (``train.profile_steps``)
    checks the prediction class by class: GEMMs, attention, grad clip, optimizer, the rest."""
    if component in ("grad clip", "optimizer"):
        return component
    return {"gemm": "gemm", "sdpa": "attention"}.get(r.kind, "other")


def report(count: StepCount, pred: Prediction) -> dict[str, Any]:
    """The JSON ``--json`` prints (``tools/gpu_session.sh`` reads ``tokens_per_s``, ``mfu``, ``step_ms``, ``memory_gb.peak``)."""
    b = count.budget
    memory = {k: v / 1e9 for k, v in count.memory_at_peak.items()}
    return {
        "card": count.card.key,
        "experts_backend": count.backend,
        **count.settings,
        "tokens_per_step": count.tokens,
        "step_ms": pred.step_ms,
        "gpu_ms": pred.gpu_ms,
        "host_ms": pred.host_ms,
        "host_issue_ms": pred.host_issue_ms,
        "tokens_per_s": pred.tokens_per_s,
        "mfu": pred.mfu,
        "tflops_per_gpu": count.formula_flops / (pred.step_ms / 1e3) / 1e12,
        "formula_tflop": count.formula_flops / 1e12,
        "model_tflop": b.model_flops / 1e12,
        "executed_tflop": sum(r.flops for r in b.ops) / 1e12,
        "glue_gb": b.glue_bytes / 1e9,
        "launches": b.launches,
        "host_syncs": b.host_syncs,
        "memory_gb": {"peak": count.peak_bytes / 1e9, **memory},
        "loss_peak_gb": count.component_peak.get("head and loss", 0) / 1e9,
        "components": pred.per_component,
        "classes_gpu_ms": pred.per_class,
    }


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"card {rep['card']}, experts.backend={rep['experts_backend']}, {rep['precision']}, activation_checkpointing="
        f"{rep['activation_checkpointing']}, {rep['tokens_per_step']:,} tokens per step",
        "",
        "| component | GEMM+attn TFLOP | glue GB | launches | host syncs | ms | share | own peak GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rep["components"].items():
        if r["launches"] == 0:
            continue
        lines.append(f"| {name} | {r['gemm_tflop']:.2f} | {r['glue_gb']:.1f} | {r['launches']:,} | {r['host_syncs']} | {r['ms']:.1f} | "
                     f"{r['share']:.1%} | {r['peak_gb']:.2f} |")
    mem = ", ".join(f"{k} {v:.1f}" for k, v in rep["memory_gb"].items() if k != "peak")
    lines += [
        "",
        f"predicted step {rep['step_ms']:.1f} ms (GPU {rep['gpu_ms']:.1f} + idle waiting for the host {rep['host_ms']:.1f}; "
        f"the host issues the step's launches in {rep['host_issue_ms']:.1f}), "
        f"{rep['tokens_per_s']:,.0f} tokens/s, {rep['tflops_per_gpu']:.0f} TFLOP/s per GPU, MFU {rep['mfu']:.1%}",
        f"FLOPs: formula {rep['formula_tflop']:.2f} TFLOP, counted {rep['model_tflop']:.2f} (executed {rep['executed_tflop']:.2f}); "
        f"glue {rep['glue_gb']:.1f} GB; {rep['launches']:,} launches; host syncs {len(rep['host_syncs'])}",
        f"peak memory {rep['memory_gb']['peak']:.1f} GB ({mem}); head and loss own peak {rep['loss_peak_gb']:.2f} GB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.step_budget", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as python -m launch.train takes them")
    parser.add_argument("--card", choices=sorted(CARDS), default="h200")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = parser.parse_intermixed_args(argv)
    count = count_step(args.overrides, args.card)
    rep = report(count, predict(count))
    print(json.dumps(rep, indent=1) if args.json else markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
