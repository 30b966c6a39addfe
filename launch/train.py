"""Train an MoE language model.

    .venv/bin/python -m launch.train                          # tiny MoE on the embedded stdlib corpus
    .venv/bin/python -m launch.train router.k=1 model.num_experts=16 train.steps=1000 logging=none
    .venv/bin/python -m launch.torchrun --standalone --nproc-per-node 8 -m launch.train parallel=ep parallel.ep_size=8

Hydra composes ``conf/train.yaml``; every group is validated (launch/job.py) before any process
group, data or model exists. ``train`` then locks the run directory (one writer per run,
launch/run_lock.py) and reads top to bottom: setup (``build_run``: the runtime's checks, data,
model, engine, resume from the newest checkpoint that verifies), then the loop (``TrainingLoop``:
step / guard / log / evaluate / checkpoint / stop until ``train.steps``).

Exit status: 0 done (or nothing left to do); 2 a configuration, data or checkpoint error, a run
directory locked by another run, or a non-finite step (one message on stderr naming the offending
thing); 3 another rank failed or stopped responding (one line naming it, parallel/heartbeat.py;
a relaunch resumes from the newest checkpoint); 128 + N after stop signal N (143 for SIGTERM, 130
for SIGINT): the current step finished and a checkpoint was saved, so rerunning the same command
resumes.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launch import cuda_graphs, run_lock
from launch.checkpoint import check_compatible, latest_checkpoint
from launch.config import JobConfig, conf_dir
from launch.data import BatchSampler, TokenSplits, memmap_corpus, stdlib_corpus, token_counts
from launch.deepspeed_launcher import from_deepspeed_launcher
from launch.engines import Engine, build_engine
from launch.job import manifest_of, register_schemas, to_job_config
from launch.log_window import LogWindow
from launch.logs import FILE_ONLY
from launch.metrics import JsonlSink, NullSink, Progress, Sink, WandbSink
from launch.optim import apply_config
from launch.throughput import ModelCounts, count_model, peak_memory_gib, peak_tflops, reset_peak_memory, window_metrics
from launch.preemption import AgentWatch, Preempted, StopSignals
from launch.profiling import StepProfiler
from launch.routing_health import RoutingHealth
from launch.routing_probe import load_probe, probe_state
from launch.run_dir import changed_overrides, register_resolvers, sweep_job_name
from launch.spike_guard import SpikeEvent, SpikeGuard, roll_back
from launch.step_guard import AgentLostError, StepGuard
from launch.train_step import StepOut, TrainStep, doc_ids
from moe.errors import ConfigError, MoeforgeError
from moe.expert_backends import expert_backend
from moe.model import MoETransformer
from parallel import Runtime, setup_runtime
from parallel.modes import check_experts
from parallel.heartbeat import RankFailure, report_failure

log = logging.getLogger("moeforge")

VAL_SPLIT = 1


def load_data(job: JobConfig) -> TokenSplits:
    d = job.data
    if d.name == "stdlib_bytes":
        return stdlib_corpus(d.val_fraction, d.max_bytes)
    return memmap_corpus(str(d.path), d.dtype, d.val_fraction, job.model.vocab_size)


def build_sinks(job: JobConfig, run_dir: Path, runtime: Runtime, raw_config: dict[str, Any], start: int) -> list[Sink]:
    """Rank 0: ``metrics.jsonl`` (lines after ``start`` dropped) and W&B (continuing the run's W&B run)."""
    if not runtime.is_main:
        return [NullSink()]
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl", start)]
    lg = job.logging
    if lg.name != "none":
        mode = "offline" if lg.name == "wandb_offline" else "online"
        sinks.append(WandbSink(mode, lg.project, lg.entity, lg.run_name, run_dir, raw_config, heatmap_every=lg.heatmap_every))
    return sinks


@torch.no_grad()
def evaluate(model: torch.nn.Module, core: MoETransformer, sampler: BatchSampler, job: JobConfig, runtime: Runtime, autocast: Any) -> dict[str, Any]:
    """Mean validation cross-entropy over ``train.eval_batches`` fixed batches, and routing flips.

    Batch 0 of the validation split is the fixed probe batch: each MoE layer's top-1 choices on it
    are compared with the previous evaluation's (``routing/layer{i}/flips``).
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for index in range(job.train.eval_batches):
        x, y = (t.to(runtime.device) for t in sampler.batch(index))
        if job.train.cuda_graphs:
            cuda_graphs.mark_step()
        with core.probing_routing() if index == 0 else nullcontext(), autocast:
            ce_sum, _ = model(x, doc_ids_BS=doc_ids(x, job.data.doc_separator), targets_BS=y, reduction="sum")
        total[0] += ce_sum.double()
        total[1] += y.numel()
    flips = core.routing_flips()
    counts = torch.tensor([*flips.values(), 1.0], dtype=torch.float64, device=runtime.device)
    runtime.all_reduce_sum_([total, counts])
    out: dict[str, Any] = {f"routing/layer{i}/flips": float(counts[j] / counts[-1]) for j, i in enumerate(flips)}
    out["val_loss"] = float(total[0] / total[1])
    model.train()
    return out


def precision_of(job: JobConfig, device: torch.device) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 on CUDA, fp32 elsewhere."""
    if job.train.precision != "auto":
        return job.train.precision
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_for(precision: str, device: torch.device) -> Any:
    """bf16 autocast on ``device`` (weights, gradients and optimizer state stay fp32), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def train(job: JobConfig, run_dir: Path, raw_config: dict[str, Any] | None = None, record: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training described by ``job``; returns the final summary.

    ``record`` runs on rank 0 once the run directory is locked (the Hydra app writes ``.hydra/``
    there), so a refused second launch never overwrites the running one's record.
    """
    t_start = time.perf_counter()
    with StopSignals(job.train.stop_signals, abort_on_second_sigint=not AgentWatch().under_torchrun) as signals:
        runtime = setup_runtime(job.parallel, job.train.device)
        try:
            dirs = [(run_dir, "run directory"), (Path(job.checkpoint.dir), "checkpoint.dir")]
            with run_lock.hold(runtime, dirs):
                if record is not None and runtime.is_main:
                    record()
                return _train(job, run_dir, runtime, raw_config or {}, t_start, signals)
        except Preempted:
            raise
        except Exception as err:  # another rank's failure is told in one line (parallel/heartbeat.py)
            failure = runtime.peer_failure(err)
            if failure is None:
                raise
            raise failure from None
        finally:
            runtime.shutdown()


def _train(job: JobConfig, run_dir: Path, runtime: Runtime, raw_config: dict[str, Any], t_start: float, signals: StopSignals) -> dict[str, Any]:
    """Setup (``build_run``), then the loop (``TrainingLoop``), then the summary."""
    run = build_run(job, run_dir, runtime, signals)
    if run.start >= job.train.steps:
        log.info(f"moeforge: nothing to do, checkpoint already at step {run.start} >= train.steps ({job.train.steps})")
        return {"step": run.start}
    refuse_stop_before_first_step(run.guard)
    loop = TrainingLoop(run, raw_config)
    summary = loop.run_steps()
    return write_summary(run, summary, loop.start, t_start)


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """What setup built, in the order it built it; the loop runs on it."""

    job: JobConfig
    run_dir: Path
    runtime: Runtime
    data: TokenSplits
    training: BatchSampler
    validation: BatchSampler
    core: MoETransformer
    """The plain transformer, for hooks and statistics (``engine.model`` may wrap it: DeepSpeed)."""
    counts: ModelCounts
    engine: Engine
    window: LogWindow
    health: RoutingHealth
    guard: StepGuard
    spikes: SpikeGuard
    start: int
    """The step of the checkpoint resumed from (0: a fresh run)."""
    inside: list[float] | None
    """[step, loss, non-finite] of the spike whose window that checkpoint was saved inside, if any."""


def build_run(job: JobConfig, run_dir: Path, runtime: Runtime, signals: StopSignals) -> Run:
    """Setup, in order: the runtime's checks, data, model, engine, then resume from the newest checkpoint that verifies."""
    tr = job.train
    check_runtime(job, runtime)
    data = load_data(job)
    training, validation = batch_samplers(job, runtime, data)
    core, counts = build_model(job, runtime, data)
    engine = build_engine(job, core, runtime, manifest_of(job))
    window = LogWindow(runtime)
    health = RoutingHealth(job.logging.health)
    guard = StepGuard(runtime, tr.on_nonfinite, tr.max_consecutive_skips, signals, AgentWatch())
    trainer = resume(job, engine, core, window)
    start = int(trainer["step"])
    spikes = SpikeGuard(runtime, tr.on_spike, tr.spike_window, tr.spike_threshold, tr.on_nonfinite == "rollback", tr.data_skips)
    spikes.load(trainer.get("spike", {}), tr.data_skips)
    inside = saved_in_spike_window(job, spikes, start)
    guard.skipped_total = int(trainer.get("skipped_steps", 0))
    return Run(job, run_dir, runtime, data, training, validation, core, counts, engine, window, health, guard, spikes, start, inside)


def check_runtime(job: JobConfig, runtime: Runtime) -> None:
    """The rules that need the runtime (world size, device), before any data or model exists; then ``train.threads``."""
    tr = job.train
    if tr.batch_size % (runtime.world_size * tr.grad_accum):
        raise ConfigError(f"train.batch_size ({tr.batch_size}) must be divisible by the world size ({runtime.world_size}) "
                          f"x train.grad_accum ({tr.grad_accum})")
    check_experts(job.parallel, runtime.world_size, job.model.num_experts)
    if tr.device == "cuda" and runtime.device.type != "cuda":
        raise ConfigError("train.device ('cuda') was asked for but no CUDA device is available")
    if job.optim.master_weights and precision_of(job, runtime.device) != "bf16":
        raise ConfigError(f"optim.master_weights (True) needs bf16: train.precision={tr.precision} resolves to fp32 on "
                          f"{runtime.device.type} (set train.precision=bf16)")
    if tr.threads:
        torch.set_num_threads(tr.threads)


def batch_samplers(job: JobConfig, runtime: Runtime, data: TokenSplits) -> tuple[BatchSampler, BatchSampler]:
    """This rank's training and validation batches."""
    tr = job.train
    training = BatchSampler(data.train, tr.seq_len, tr.batch_size, tr.seed, runtime.rank, runtime.world_size, split="training")
    validation = BatchSampler(data.val, tr.seq_len, tr.batch_size, tr.seed, runtime.rank, runtime.world_size, VAL_SPLIT, split="validation")
    return training, validation


def build_model(job: JobConfig, runtime: Runtime, data: TokenSplits) -> tuple[MoETransformer, ModelCounts]:
    """The seeded model on ``runtime.device`` and its counts, prepared: token table, recomputation, compilation."""
    tr = job.train
    torch.manual_seed(tr.seed)
    with runtime.device:  # initialise in place: a billion-parameter preset is not drawn on the host
        core = MoETransformer(job.model, job.router, job.experts)
    counts = count_model(core, tr.seq_len)
    core.prepare(runtime.device)
    wanted = core.token_counts_wanted()
    if wanted:  # e.g. hash routing's frequency-balanced table; a resume reloads the same table
        core.fit_token_counts(token_counts(data.train, job.model.vocab_size, wanted))
    core.set_activation_checkpointing(tr.activation_checkpointing)
    core.set_fp32_residual(tr.fp32_residual)
    compile_model(job, runtime, core)
    return core, counts


def compile_model(job: JobConfig, runtime: Runtime, core: MoETransformer) -> None:
    """``train.cuda_graphs`` (refused, saying why, where it cannot run) or ``train.compile``: every block compiled."""
    if job.train.cuda_graphs:
        layers = core.moe_layers()
        why = cuda_graphs.refusal(job, runtime.device, layers[0][1].experts.backend) if layers else None
        if why is not None:
            raise ConfigError(why)
        core.compile_blocks(mode="reduce-overhead")
    elif job.train.compile:
        core.compile_blocks()


def resume(job: JobConfig, engine: Engine, core: MoETransformer, window: LogWindow) -> dict[str, Any]:
    """Load the newest checkpoint that verifies (``checkpoint.resume=auto``); returns its trainer counters."""
    if job.checkpoint.resume != "auto":
        existing = latest_checkpoint(job.checkpoint.dir)
        if existing is not None:
            log.warning(f"moeforge: checkpoint.resume=never: starting over although {existing} exists (kept until pruned; "
                        f"checkpoint.resume=auto would resume from the newest checkpoint there)")
        return {"step": 0}
    path = engine.select_checkpoint()
    if path is None:
        return {"step": 0}
    trainer = restore(job, engine, core, window, path)
    log.info(f"moeforge: resumed from {path} at step {trainer['step']}")
    return trainer


def restore(job: JobConfig, engine: Engine, core: MoETransformer, window: LogWindow, path: Path) -> dict[str, Any]:
    """Load checkpoint ``path`` (model, optimizer, schedule, RNG, log window); returns its trainer counters."""
    check_compatible(path, engine.manifest)
    trainer = engine.load(path)
    window.load(trainer.get("window", {}), core)
    load_probe(core, engine.runtime, trainer.get("probe"))
    window.restart_clock()
    changed = apply_config(engine.optimizer, engine.scheduler, job)
    if changed:
        log.info(f"moeforge: the config differs from the checkpoint ({'; '.join(changed)}); using the config")
    return trainer


def saved_in_spike_window(job: JobConfig, spikes: SpikeGuard, start: int) -> list[float] | None:
    """The spike whose window the checkpoint of step ``start`` was saved inside, if any; warned about unless
    ``train.on_spike=rollback``, where the loop rolls back from it before training on."""
    inside = spikes.in_spike_window(start) if start else None
    if inside is not None and not spikes.rolls_back:
        what = f"{job.checkpoint.dir}/step_{start:08d} was saved inside a loss-spike window (spike at step {int(inside[0])}, loss {inside[1]:.4g})"
        log.warning(f"moeforge: resumed from a checkpoint inside a spike window: {what}; train.on_spike=rollback would resume "
                    f"from an older one")
    return inside


def refuse_stop_before_first_step(guard: StepGuard) -> None:
    """A stop signal during setup ends the run here: nothing new to save."""
    first = guard.check()
    if first.signum:
        raise Preempted(first.signum, f"moeforge: {signal.Signals(first.signum).name} before the first step; nothing new to save, "
                                      f"exiting with {128 + first.signum}")


def describe_run(run: Run, precision: str) -> str:
    """The run's one-line description: data, model size and FLOPs, precision, run directory, expert backend."""
    job = run.job
    note = expert_backend(job.experts.backend).choice_note(run.runtime.device, job.model.num_experts)
    return (f"moeforge: {run.data.description}; model {job.model.name}: {run.counts.describe()}; "
            f"{run.counts.flops_per_token / 1e9:.3g} GFLOP per token; {precision}; run dir {run.run_dir}"
            + "".join(f"; {n}" for n in [note] if n))


# ------------------------------------------------------------------------------------------- loop


class TrainingLoop:
    """Step, guard, log, evaluate, checkpoint, stop; from ``run.start`` until ``train.steps``."""

    def __init__(self, run: Run, raw_config: dict[str, Any]) -> None:
        job, runtime = run.job, run.runtime
        self.run, self.job, self.runtime, self.tr = run, job, runtime, job.train
        self.writer = run.engine.checkpoint_writer()
        self.writer.run_config = raw_config or None  # every checkpoint carries config.yaml: it loads without the run directory
        precision = precision_of(job, runtime.device)
        self.autocast = autocast_for(precision, runtime.device)
        self.peak = peak_tflops(runtime.device, precision, self.tr.peak_tflops)
        self.sinks = build_sinks(job, run.run_dir, runtime, raw_config, run.start)
        self.start = run.start
        """Where the loop starts: ``run.start``, or older after rolling back from a checkpoint saved inside a spike window."""
        if run.inside is not None and run.spikes.rolls_back:  # never train on from weights saved inside a spike window
            spike = run.inside
            self.start = self.rollback(SpikeEvent(int(spike[0]), float(spike[1]), math.nan, math.nan, nonfinite=bool(spike[2])))
        self.progress = Progress(self.tr.steps, self.start) if runtime.is_main else None
        log.info(describe_run(run, precision))
        self.train_step = TrainStep(job, run.engine, run.core, runtime, run.guard, run.window, self.autocast)
        self.profiler = StepProfiler(self.tr.profile_steps, run.run_dir / "profile", runtime.rank, runtime.device)
        self.summary: dict[str, Any] = {"step": self.start}
        """The last value of every metric logged (``summary.json``)."""

    def run_steps(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns the summary. Sinks and the progress bar close however it ends."""
        reset_peak_memory(self.runtime.device)
        try:
            step = self.start
            while step < self.tr.steps:
                step = self.one_step(step)
        finally:
            if self.progress is not None:
                self.progress.close()
            for sink in self.sinks:
                sink.close()
        return self.summary

    def one_step(self, step: int) -> int:
        """Optimizer step ``step`` (0-based), then what is due after it; returns the next step (an older one after a rollback)."""
        run, tr, ckpt = self.run, self.tr, self.job.checkpoint
        x, y = (t.to(self.runtime.device) for t in run.training.batch(run.spikes.batch_index(step)))
        self.profiler.before(step + 1)
        out = self.train_step(step, x, y)
        self.profiler.after(step + 1)
        if out.host.agent_gone and not out.host.signum:
            raise AgentLostError(f"the torchrun agent (pid {run.guard.agent.agent_pid}) is gone; stopping at step {step + 1} "
                                 f"without writing (a relaunch resumes from {latest_checkpoint(ckpt.dir)})")
        done = step + 1
        run.spikes.record(done, out.ce, out.grad_norm)
        stop = bool(out.host.signum) and done < tr.steps
        logs, evals = done % tr.log_every == 0 or done == tr.steps, done % tr.eval_every == 0 or done == tr.steps
        due = ckpt.enabled and ((ckpt.every and done % ckpt.every == 0) or done == tr.steps or stop)
        # The previous step's non-finite verdict (one step late, so the device is never waited on mid-queue);
        # this step's, and the spike guard's, before anything is logged, evaluated or saved.
        self.settle(step if logs or evals or due else step - 1)
        if logs or evals or due:
            event = self.settle_spikes()
            if event is not None:
                return self.rollback(event)
        metrics = self.training_metrics(done, out) if logs else {}
        if evals:
            metrics.update({"step": done, **evaluate(run.engine.model, run.core, run.validation, self.job, self.runtime, self.autocast)})
        if metrics:
            self.report(done, metrics)
        if due:
            self.save(done, stop)
        if stop:
            raise Preempted(out.host.signum, f"moeforge: {signal.Signals(out.host.signum).name}: finished step {done} and saved "
                            f"{latest_checkpoint(ckpt.dir)}; exiting with {128 + out.host.signum} (rerun the same command to resume)")
        if "loss" in metrics:  # throughput windows exclude evaluation and checkpoint time
            run.window.restart_clock()
            reset_peak_memory(self.runtime.device)
        return done

    def settle(self, through: int) -> None:
        """Non-finite verdicts of the steps through ``through`` (launch/step_guard.py), acted on per ``train.on_nonfinite``."""
        self.run.guard.settle(through, lambda: str(latest_checkpoint(self.job.checkpoint.dir) or "no checkpoint"), self.start or None,
                              self.writer.finish)

    def settle_spikes(self) -> SpikeEvent | None:
        """The spike guard's verdict (launch/spike_guard.py): spikes to warn about are told, one to roll back from returned."""
        event = self.run.spikes.settle()
        for warned in self.run.spikes.warned:
            log.warning(f"moeforge: {warned.describe()} (train.on_spike=warn)")
            for sink in self.sinks:
                sink.alert("moeforge: loss spike", warned.describe())
        return event

    def rollback(self, event: SpikeEvent) -> int:
        """Roll back after ``event`` (launch/spike_guard.py); returns the step to continue from."""
        run, tr, engine = self.run, self.tr, self.run.engine
        self.writer.finish()  # an async save of an earlier step is published (or fails) before anything is retired
        step, report = roll_back(event, run.spikes, self.job.checkpoint.dir, self.runtime, tr.max_rollbacks, tr.skip_batches, tr.data_skips,
                                 lambda path, rt: engine.verify(path), lambda path: restore(self.job, engine, run.core, run.window, path))
        log.warning(f"moeforge: {report}")
        for sink in self.sinks:
            sink.rewind(step)
            sink.alert("moeforge: loss spike, rolled back", report)
            sink.log({"step": step, "rollbacks": run.spikes.rollbacks, "rollback/spike_step": event.step, "rollback/spike_loss": event.loss,
                      "rollback/skip_batches": tr.skip_batches})
        return step

    def training_metrics(self, done: int, out: StepOut) -> dict[str, Any]:
        """Step ``done``'s log line: loss over the window, lr, gradient norm, throughput, memory, auxiliary losses,
        communication, routing; then the routing-health flags (each warning told)."""
        run, runtime = self.run, self.runtime
        seconds = time.perf_counter() - run.window.t0
        metrics: dict[str, Any] = {
            "step": done,
            "loss": run.window.take_loss(),
            "lr": run.engine.scheduler.get_last_lr()[0],
            "grad_norm": float(out.grad_norm),
            "tokens_per_s": run.window.tokens / seconds,
            **window_metrics(run.counts, run.window.tokens, seconds, runtime.world_size, self.peak),
            "peak_mem_gib": peak_memory_gib(runtime.device),
            **runtime.mean_over_ranks(out.aux),  # the step's auxiliary losses, mean over ranks
            **runtime.comm_metrics(over_ranks=True),  # bytes per step, summed over ranks
            **run.core.take_routing_metrics(runtime.all_reduce_sum_, runtime.all_reduce_max_),
        }
        if self.tr.on_nonfinite != "stop":
            metrics["skipped_steps"] = run.guard.skipped_total
        if run.spikes.rolls_back:
            metrics["rollbacks"] = run.spikes.rollbacks
        flags, warnings = run.health.check(metrics)
        metrics.update(flags)
        for layer, text in warnings:
            log.warning(f"moeforge: step {done}: {text}")
            for sink in self.sinks:
                sink.alert(f"routing health: MoE layer {layer}", f"step {done}: {text}")
        return metrics

    def report(self, done: int, metrics: dict[str, Any]) -> None:
        """``metrics`` to every sink, the summary and the progress bar."""
        for sink in self.sinks:
            sink.log(metrics)
        self.summary.update(metrics)
        if self.progress is not None and "loss" in metrics:
            self.progress.update(done, metrics)

    def save(self, done: int, stop: bool) -> None:
        """Checkpoint step ``done`` (published now at the end and on a stop; an async save is published by the next)."""
        run = self.run
        t_save = time.perf_counter()
        trainer = {"step": done, "skipped_steps": run.guard.skipped_total, "window": run.window.state(run.core),
                   "spike": run.spikes.state(done), "probe": probe_state(run.core, self.runtime)}
        saved = run.engine.save(self.writer, done, trainer)
        if done == self.tr.steps or stop:
            saved = self.writer.finish() or saved
        log.info(f"moeforge: checkpoint step {done} {'saved' if saved else 'staged (async)'} in "
                 f"{time.perf_counter() - t_save:.2f}s", extra=FILE_ONLY)


def write_summary(run: Run, summary: dict[str, Any], start: int, t_start: float) -> dict[str, Any]:
    """The summary with wall time (and the step resumed at); rank 0 writes ``summary.json`` and the last line."""
    summary["wall_s"] = time.perf_counter() - t_start
    if start:
        summary["resumed_at_step"] = start
    if run.runtime.is_main:
        scalars = {k: v for k, v in summary.items() if not isinstance(v, list)}
        (run.run_dir / "summary.json").write_text(json.dumps(scalars, indent=1))
        vocab = run.job.model.vocab_size
        log.info(f"moeforge: step {summary['step']} val_loss {summary['val_loss']:.4f} (uniform over the vocabulary: "
                 f"ln {vocab} = {math.log(vocab):.3f}) in {summary['wall_s']:.0f}s")
    return summary


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml``: the files Hydra would write, written
    only once the run directory is locked (``conf/hydra/moeforge.yaml`` turns Hydra's own copy off)."""
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    hc = HydraConfig.get()
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), out / "hydra.yaml")


register_resolvers()
register_schemas()


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        job = to_job_config(cfg)
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        if hc.mode == RunMode.MULTIRUN:  # job N of a sweep: its own directory, checkpoints and W&B run
            changed = changed_overrides(run_dir, list(hc.overrides.task))
            if changed:
                log.warning(f"moeforge: {run_dir} holds an earlier job with other overrides ({'; '.join(changed)}); continuing "
                            f"from its checkpoints, if any (a new sweep wants another MOEFORGE_RUN_ID or hydra.sweep.dir)")
            if job.logging.run_name is None:
                job.logging.run_name = sweep_job_name(hc.sweep.dir, hc.job.num)
        train(job, run_dir, OmegaConf.to_container(cfg, resolve=True), lambda: write_hydra_record(run_dir, cfg))  # type: ignore[arg-type]
    except Preempted as stop:
        log.warning(str(stop))
        sys.exit(stop.exit_code)
    except RankFailure as failure:
        report_failure(str(failure))
        sys.exit(failure.exit_code)
    except MoeforgeError as err:
        log.error(f"moeforge: error: {err}")
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = from_deepspeed_launcher(sys.argv)  # the deepspeed launcher's --local_rank=N is not a Hydra override
    main()
