"""Train an MoE language model.

    python -m launch.train                                    # tiny MoE on the embedded stdlib corpus
    python -m launch.train router.k=1 model.num_experts=16 train.steps=1000 logging=none
    torchrun --standalone --nproc-per-node 8 -m launch.train parallel=ep parallel.ep_size=8

Hydra composes ``conf/train.yaml``; every group is validated (launch/config.py) before any
process group, data or model exists. The loop below reads top to bottom: setup, resume, then
step / log / evaluate / checkpoint until ``train.steps``. Exit status 0 on success, 2 on a
configuration, data or checkpoint error (message on stderr naming the offending thing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launch.checkpoint import check_compatible, latest_checkpoint, load_checkpoint, save_checkpoint
from launch.config import JobConfig, conf_dir, register_schemas, to_job_config
from launch.data import BatchSampler, TokenSplits, memmap_corpus, stdlib_corpus, token_counts
from launch.metrics import JsonlSink, NullSink, Progress, Sink, WandbSink
from moe.errors import ConfigError, MoeforgeError
from moe.model import MoETransformer
from moe.stats import RoutingStats, routing_flip_fraction
from parallel import Runtime, apply_parallel, checkpoint_state, load_checkpoint_state, setup_runtime
from parallel.config import check_experts

VAL_SPLIT = 1


def load_data(job: JobConfig) -> TokenSplits:
    d = job.data
    if d.name == "stdlib_bytes":
        return stdlib_corpus(d.val_fraction, d.max_bytes)
    return memmap_corpus(str(d.path), d.dtype, d.val_fraction, job.model.vocab_size)


def doc_ids(tokens_BS: torch.Tensor, separator: int | None) -> torch.Tensor | None:
    """Document index of every position: it increases by one after each ``separator`` token."""
    if separator is None:
        return None
    ends = (tokens_BS == separator).long()
    return torch.cumsum(ends, dim=1) - ends


def build_optimizer(model: torch.nn.Module, job: JobConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only) with linear warmup then cosine decay to lr*min_lr_ratio."""
    o, steps = job.optim, job.train.steps
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    init_adamw_state(opt)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def init_adamw_state(opt: torch.optim.AdamW) -> None:
    """Create every parameter's AdamW state now (step 0, zero moments) instead of at its first grad.

    AdamW creates state lazily, so a parameter that has had no gradient yet (a gate during
    EvoMoE's base phase, an expert no token reached) would be missing from a checkpoint, and the
    checkpoint's keys would depend on routing history. State created here is exactly what AdamW
    creates on a first step (``torch.optim.AdamW._init_group``: step 0, zero ``exp_avg`` and
    ``exp_avg_sq``), and AdamW skips parameters without gradients, so training is unchanged.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def build_sinks(job: JobConfig, run_dir: Path, runtime: Runtime, raw_config: dict[str, Any]) -> list[Sink]:
    if not runtime.is_main:
        return [NullSink()]
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
    lg = job.logging
    if lg.name != "none":
        mode = "offline" if lg.name == "wandb_offline" else "online"
        sinks.append(WandbSink(mode, lg.project, lg.entity, lg.run_name, run_dir, raw_config))
    return sinks


def routing_metrics(model: MoETransformer, runtime: Runtime) -> dict[str, Any]:
    """Reduce every MoE layer's accumulated stats across ranks, summarise, and reset them."""
    out: dict[str, Any] = {}
    for i, layer in model.moe_layers():
        sums, maxes = layer.stats.raw()
        runtime.all_reduce_sum_(list(sums.values()))
        runtime.all_reduce_max_(list(maxes.values()))
        for key, value in RoutingStats.summarize(sums, maxes).items():
            out[f"routing/layer{i}/{key}"] = value
        layer.stats.reset()
    return out


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
        for _, layer in core.moe_layers():
            layer.record_probe = index == 0
        with autocast:
            logits, _ = model(x, doc_ids_BS=doc_ids(x, job.data.doc_separator))
        total[0] += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        total[1] += y.numel()
    out: dict[str, Any] = {}
    flips = []
    for i, layer in core.moe_layers():
        layer.record_probe = False
        if layer.previous_probe_top1_T is not None:
            flips.append((i, routing_flip_fraction(layer.previous_probe_top1_T, layer.probe_top1_T)))
    counts = torch.tensor([f for _, f in flips] + [1.0], dtype=torch.float64, device=runtime.device)
    runtime.all_reduce_sum_([total, counts])
    for j, (i, _) in enumerate(flips):
        out[f"routing/layer{i}/flips"] = float(counts[j] / counts[-1])
    out["val_loss"] = float(total[0] / total[1])
    model.train()
    return out


def manifest_of(job: JobConfig) -> dict[str, Any]:
    """The config that shapes tensors in a checkpoint; a resume must match it."""
    model = dataclasses.asdict(job.model)
    model.pop("name", None)
    return {"model": model, "router": {"name": job.router.name}}


def train(job: JobConfig, run_dir: Path, raw_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training described by ``job``; returns the final summary."""
    runtime = setup_runtime(job.parallel)
    t_start = time.perf_counter()
    try:
        return _train(job, run_dir, runtime, raw_config or {}, t_start)
    finally:
        runtime.shutdown()


def _train(job: JobConfig, run_dir: Path, runtime: Runtime, raw_config: dict[str, Any], t_start: float) -> dict[str, Any]:
    tr = job.train
    if tr.batch_size % runtime.world_size:
        raise ConfigError(f"train.batch_size ({tr.batch_size}) must be divisible by the world size ({runtime.world_size})")
    check_experts(job.parallel, runtime.world_size, job.model.num_experts)
    if tr.device == "cuda" and runtime.device.type != "cuda":
        raise ConfigError("train.device ('cuda') was asked for but no CUDA device is available")
    if tr.threads:
        torch.set_num_threads(tr.threads)
    data = load_data(job)
    train_sampler = BatchSampler(data.train, tr.seq_len, tr.batch_size, tr.seed, runtime.rank, runtime.world_size)
    val_sampler = BatchSampler(data.val, tr.seq_len, tr.batch_size, tr.seed, runtime.rank, runtime.world_size, VAL_SPLIT)

    torch.manual_seed(tr.seed)
    core = MoETransformer(job.model, job.router, job.experts).to(runtime.device)
    for _, layer in core.moe_layers():
        layer.resolve_backend(runtime.device)
    wanted = max((layer.router.wants_token_counts for _, layer in core.moe_layers()), default=0)
    if wanted:  # e.g. hash routing's frequency-balanced table; a resume reloads the same table
        counts_V = token_counts(data.train, job.model.vocab_size, wanted)
        for _, layer in core.moe_layers():
            layer.router.fit_token_counts(counts_V)
    # ``model`` may be a wrapper (DDP); ``core`` stays the plain transformer for hooks and stats.
    model = apply_parallel(core, job.parallel, runtime)
    optimizer, scheduler = build_optimizer(model, job)

    start = 0
    ckpt_dir = Path(job.checkpoint.dir)
    latest = latest_checkpoint(ckpt_dir) if job.checkpoint.resume == "auto" else None
    if latest is not None:
        check_compatible(latest, manifest_of(job))
        state = {**checkpoint_state(model, optimizer, runtime), "scheduler": scheduler.state_dict(), "trainer": {"step": 0}}
        load_checkpoint(latest, state, runtime)
        load_checkpoint_state(model, optimizer, state, runtime)
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["trainer"]["step"])
        if runtime.is_main:
            print(f"moeforge: resumed from {latest} at step {start}", file=sys.stderr)

    on_cuda = runtime.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    sinks = build_sinks(job, run_dir, runtime, raw_config) if start < tr.steps else [NullSink()]
    progress = Progress(tr.steps, start) if runtime.is_main else None
    if runtime.is_main:
        params = sum(p.numel() for p in model.parameters())
        print(f"moeforge: {data.description}; {params:,} parameters; run dir {run_dir}", file=sys.stderr)

    summary: dict[str, Any] = {"step": start}
    window_loss = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    window_t0, window_tokens = time.perf_counter(), 0
    for step in range(start, tr.steps):
        x, y = (t.to(runtime.device) for t in train_sampler.batch(step))
        with autocast:
            logits, aux = model(x, step=step, doc_ids_BS=doc_ids(x, job.data.doc_separator))
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss = ce + sum(aux.values(), torch.zeros((), device=runtime.device))
        if not torch.isfinite(loss):
            raise MoeforgeError(f"non-finite loss {loss.item()} at step {step}; lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        runtime.before_optimizer_step(model)
        grad_norm = runtime.clip_grad_norm_(model, job.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        runtime.after_optimizer_step(model, optimizer, step)
        runtime.all_reduce_sum_([t for _, layer in core.moe_layers() for t in layer.router.step_sums()])
        core.after_step(step)
        done = step + 1
        window_loss += torch.stack([ce.detach().double(), torch.ones((), dtype=torch.float64, device=runtime.device)])
        window_tokens += x.numel() * runtime.world_size

        metrics: dict[str, Any] = {}
        if done % tr.log_every == 0 or done == tr.steps:
            runtime.all_reduce_sum_([window_loss])
            elapsed = time.perf_counter() - window_t0
            metrics.update({
                "step": done,
                "loss": float(window_loss[0] / window_loss[1]),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_tokens / elapsed,
                **{name: float(v.detach()) for name, v in aux.items()},
                **runtime.comm_metrics(),
                **routing_metrics(core, runtime),
            })
            window_loss.zero_()
        if done % tr.eval_every == 0 or done == tr.steps:
            metrics.update({"step": done, **evaluate(model, core, val_sampler, job, runtime, autocast)})
        if metrics:
            for sink in sinks:
                sink.log(metrics)
            summary.update(metrics)
            if progress is not None and "loss" in metrics:
                extra = f"val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
                progress.update(done, metrics["loss"], metrics["tokens_per_s"], extra)
        if (job.checkpoint.every and done % job.checkpoint.every == 0) or done == tr.steps:
            state = {**checkpoint_state(model, optimizer, runtime), "scheduler": scheduler.state_dict(), "trainer": {"step": done}}
            save_checkpoint(ckpt_dir, done, state, manifest_of(job), runtime, job.checkpoint.keep)
        if "loss" in metrics:  # throughput windows exclude evaluation and checkpoint time
            window_t0, window_tokens = time.perf_counter(), 0

    if progress is not None:
        progress.close()
    for sink in sinks:
        sink.close()
    summary["wall_s"] = time.perf_counter() - t_start
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        scalars = {k: v for k, v in summary.items() if not isinstance(v, list)}
        (run_dir / "summary.json").write_text(json.dumps(scalars, indent=1))
        if "val_loss" in summary:
            uniform = math.log(job.model.vocab_size)
            print(f"moeforge: step {summary['step']} val_loss {summary['val_loss']:.4f} (uniform over the vocabulary: "
                  f"ln {job.model.vocab_size} = {uniform:.3f}) in {summary['wall_s']:.0f}s", file=sys.stderr)
        else:
            print(f"moeforge: nothing to do, checkpoint already at step {start} >= train.steps ({tr.steps})", file=sys.stderr)
    return summary


def _rank0_only(value: str) -> str | None:
    """Hydra resolver: ``value`` on rank 0 (or outside torchrun), None elsewhere."""
    return value if os.environ.get("RANK", "0") == "0" else None


OmegaConf.register_new_resolver("moeforge_rank0", _rank0_only, replace=True)
register_schemas()


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        job = to_job_config(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        train(job, run_dir, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except MoeforgeError as err:
        print(f"moeforge: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
