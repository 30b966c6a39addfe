"""Config schemas of the runtime's groups, the typed job, and the rules across its groups.

Each group is a typed dataclass (the source of truth); YAML under ``conf/`` stays thin and starts
from ``/schema/<group>@_here_``. Component configs live beside their classes
(``moe.model.ModelConfig``, ``moe.routers.topk.TopKConfig``, each engine's ``Config`` in
launch/engines/, ...); the groups that belong to the runtime are defined here. launch/job.py
registers every schema with Hydra and turns a composed config into a ``JobConfig``.

A typo'd key or a wrongly typed value fails in Hydra's merge with the full key named; a value that
breaks a rule fails in the dataclass's ``__post_init__`` (``moe.errors.ConfigError``), and a rule
across groups in ``validate_job`` (the chosen engine's own in its ``check_job``); all before any
process group, model or data exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.preemption import signal_number
from launch.routing_health import HealthConfig
from moe.errors import check
from moe.expert_backends import expert_backend
from moe.experts import ExpertsConfig
from moe.model import ModelConfig
from moe.recompute import MODES as RECOMPUTE_MODES
from moe.routers import RouterConfig
from parallel import ParallelConfig

DATA_NAMES = ("stdlib_bytes", "memmap")
SCHEDULES = ("cosine", "wsd", "constant")
MOMENTS_DTYPES = ("fp32", "bf16")
PRECISIONS = ("auto", "bf16", "fp32")
LOGGING_NAMES = ("wandb_offline", "wandb", "none")


@dataclass(kw_only=True)
class DataConfig:
    name: str = "stdlib_bytes"
    """stdlib_bytes (embedded byte corpus from the running Python's stdlib) | memmap (token shards)."""
    path: str | None = None
    """memmap: a .bin file or a folder of .bin shards of little-endian token ids."""
    dtype: str = "uint16"
    """memmap: uint16 | uint32."""
    val_fraction: float = 0.05
    """Fraction held out for validation (stdlib: of files, by path hash; memmap: the tail)."""
    max_bytes: int = 8_000_000
    """stdlib_bytes: cap on the training corpus size, so start-up stays fast."""
    doc_separator: int | None = None
    """Token id that ends a document (stdlib_bytes: 0, the NUL byte between files). Routers that mix
    across tokens (similarity, attention_aware) never mix across a separator; null = one document."""

    def __post_init__(self) -> None:
        check(self.name in DATA_NAMES, "data.name", self.name, f"must be one of {list(DATA_NAMES)}")
        check(self.dtype in ("uint16", "uint32"), "data.dtype", self.dtype, "must be uint16 or uint32")
        check(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "must be in (0, 0.5)")
        check(self.max_bytes >= 100_000, "data.max_bytes", self.max_bytes, "must be >= 100000")
        if self.name == "memmap":
            check(bool(self.path), "data.path", self.path, "must be set for data=memmap")
            check(Path(str(self.path)).exists(), "data.path", self.path, "does not exist")


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    """Peak learning rate after warmup."""
    schedule: str = "cosine"
    """After a linear warmup: cosine (decay to lr * min_lr_ratio at train.steps) | wsd (warmup-stable-
    decay: constant lr, then a linear decay to lr * min_lr_ratio over the last decay_fraction of the
    steps) | constant."""
    min_lr_ratio: float = 0.1
    """Where cosine and wsd end, as a fraction of lr."""
    decay_fraction: float = 0.2
    """wsd: share of train.steps spent decaying at the end."""
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables."""
    moments_dtype: str = "fp32"
    """AdamW's first and second moments: fp32 (torch's AdamW, fused on CUDA) | bf16 (moeforge's AdamW kernel,
    ``launch.kernel_adamw``: fp32 weights, gradients and math, moments stored in bf16; DeepSeek-V3, arXiv
    2412.19437, sec. 3.3.3). bf16 saves 8 of 28 bytes of optimizer traffic and 8 of 16 bytes of state per parameter."""
    master_weights: bool = False
    """Hold the MoE layers' stacked expert weights in bf16 on the model and their fp32 master copies in the optimizer
    (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1; Megatron-LM's bf16 params with fp32 main params):
    no weight cast in the forward, no gradient cast in the backward, and one optimizer pass reads the bf16 gradient and
    the master and writes the master, the moments and the bf16 weight (``launch.kernel_adamw``, either moments dtype).
    Needs bf16 (``train.precision=bf16``, or auto on a GPU), ``train.grad_accum=1``, ``parallel=none`` and ``engine=native``.
    Checkpoints hold the fp32 masters in the model's usual keys."""

    def __post_init__(self) -> None:
        check(self.name == "adamw", "optim.name", self.name, "must be adamw")
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"must be one of {list(SCHEDULES)}")
        check(0 < self.decay_fraction <= 1, "optim.decay_fraction", self.decay_fraction, "must be in (0, 1]")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "must be in [0, 1)")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")
        check(self.moments_dtype in MOMENTS_DTYPES, "optim.moments_dtype", self.moments_dtype, f"must be one of {list(MOMENTS_DTYPES)}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    """Global batch in sequences per optimizer step; split evenly across ranks, then into
    grad_accum micro-batches on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: gradients of batch_size / (ranks * grad_accum) sequences
    at a time are summed before the update, the same step as one big batch with less memory.
    Cross-entropy, z-loss and routing statistics are those of the whole batch; Switch's balance
    loss counts f over one micro-batch (on every rank with router.balance_scope=global)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (autocast; weights and optimizer stay fp32)
    | fp32."""
    fp32_residual: bool = False
    """Under bf16 autocast (GPUs), keep the residual stream between blocks in fp32 (Megatron-LM's
    --fp32-residual-connection); false: it is bf16 like the activations around it (fewer bytes per add and norm)."""
    activation_checkpointing: str = "none"
    """none | full (recompute every block in the backward) | selective (keep GEMM and attention
    outputs, recompute the elementwise rest)."""
    compile: bool = False
    """torch.compile every transformer block (inductor)."""
    cuda_graphs: bool = False
    """Replay every transformer block from CUDA graphs (torch.compile mode=reduce-overhead; launch/cuda_graphs.py):
    CUDA, dropless, parallel=none|ddp, an expert backend that keeps counts on the device; refused otherwise."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: run torch.profiler over optimizer steps first..last (numbered from 1, as logged) and write
    each rank's device time per class and kernel, and its Chrome trace, to <run dir>/profile/ (launch/profiling.py).
    Empty: no profiling."""
    peak_tflops: float = 0.0
    """Dense peak TFLOP/s per device for MFU; 0 looks the device up in launch/throughput.py
    (CPUs and unknown GPUs then report TFLOP/s without MFU)."""
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100
    """Validation loss (and routing flips on the probe batch) every this many steps and at the end."""
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 keeps torch's default."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/Inf: stop (before the update, nothing saved) | skip
    (no update; the step still counts) | rollback (no update, then at the next log or save the run
    rolls back like a loss spike, see on_spike)."""
    on_spike: str = "warn"
    """A loss spike (launch/spike_guard.py: loss > median + spike_threshold x max(1.4826 MAD, 1% of
    the median) of the last spike_window losses): off | warn (one line, a W&B alert) | rollback
    (reload the newest checkpoint older than the spike window, skip skip_batches batches)."""
    spike_window: int = 50
    """Steps in the running statistic; also the spike window: a rollback target is at least this
    many steps older than the spike, and a checkpoint saved within this many steps after one is
    never a target."""
    spike_threshold: float = 6.0
    """How many robust standard deviations (1.4826 x MAD) above the median make a spike."""
    max_rollbacks: int = 3
    """on_spike/on_nonfinite=rollback: give up (exit 2, one line) when one more would be needed."""
    skip_batches: int = 200
    """Batches skipped after a rollback, from the checkpoint's step on (PaLM, Chowdhery et al. 2022,
    §5.1, skipped 200-500 batches)."""
    data_skips: list[list[int]] = field(default_factory=list)
    """Batches to skip, told in advance: each [step, count] makes the steps from `step` on read
    `count` batches further ahead (a rollback records its skip the same way in the checkpoint)."""
    max_consecutive_skips: int = 10
    """on_nonfinite=skip: stop anyway when this many steps in a row were skipped."""
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals that make the run finish its step, save a checkpoint and exit with 128 + the signal
    number (143 for SIGTERM): preemption, Ctrl-C, SLURM's `--signal` ahead of a time limit."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
            value = getattr(self, key)
            check(value >= 1, f"train.{key}", value, "must be >= 1")
        check(self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "must be auto, cpu or cuda")
        check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        check(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
              f"must be divisible by train.grad_accum ({self.grad_accum})")
        check(self.precision in PRECISIONS, "train.precision", self.precision, f"must be one of {list(PRECISIONS)}")
        check(self.activation_checkpointing in RECOMPUTE_MODES, "train.activation_checkpointing", self.activation_checkpointing,
              f"must be one of {list(RECOMPUTE_MODES)}")
        check(self.profile_steps == [] or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]
                                           <= self.steps), "train.profile_steps", self.profile_steps,
              f"must be [] or [first, last] with 1 <= first <= last <= train.steps ({self.steps})")
        check(self.peak_tflops >= 0, "train.peak_tflops", self.peak_tflops, "must be >= 0")
        check(self.threads >= 0, "train.threads", self.threads, "must be >= 0")
        check(self.on_nonfinite in ("stop", "skip", "rollback"), "train.on_nonfinite", self.on_nonfinite, "must be stop, skip or rollback")
        check(self.on_spike in ("off", "warn", "rollback"), "train.on_spike", self.on_spike, "must be off, warn or rollback")
        check(self.spike_window >= 2, "train.spike_window", self.spike_window, "must be >= 2")
        check(self.spike_threshold > 0, "train.spike_threshold", self.spike_threshold, "must be > 0")
        check(self.max_rollbacks >= 0, "train.max_rollbacks", self.max_rollbacks, "must be >= 0")
        check(self.skip_batches >= 0, "train.skip_batches", self.skip_batches, "must be >= 0")
        for entry in self.data_skips:
            check(len(entry) == 2 and min(entry) >= 0, "train.data_skips", self.data_skips, "must be a list of [step, count] pairs >= 0")
        check(self.max_consecutive_skips >= 1, "train.max_consecutive_skips", self.max_consecutive_skips, "must be >= 1")
        for name in self.stop_signals:
            signal_number(name)


@dataclass(kw_only=True)
class LoggingConfig:
    name: str = "wandb_offline"
    """wandb_offline (no network; `wandb sync` later) | wandb (online) | none."""
    project: str = "moeforge"
    entity: str | None = None
    run_name: str | None = None
    heatmap_every: int = 10
    """W&B: log each MoE layer's experts x steps load heatmap image every this many log steps (and at
    the end); 0 turns it off."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Routing-health warnings (launch/routing_health.py): logging.health.windows, .max_min_load,
    .dead_fraction, .min_entropy_frac, .enabled."""

    def __post_init__(self) -> None:
        check(self.name in LOGGING_NAMES, "logging.name", self.name, f"must be one of {list(LOGGING_NAMES)}")
        check(self.heatmap_every >= 0, "logging.heatmap_every", self.heatmap_every, "must be >= 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "${hydra:runtime.output_dir}/checkpoints"
    """Default: ``checkpoints/`` in the job's own directory (the run directory, or a sweep job's
    ``runs/sweep_<id>/<job number>``), so no two jobs ever share checkpoints."""
    every: int = 100
    """Save every this many steps (and at the end); 0 saves only at the end."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in dir, if any | never: start fresh."""
    keep: int = 2
    """How many complete checkpoints to keep (older ones are deleted after a new one completes)."""
    enabled: bool = True
    """false: never write a checkpoint (throughput runs); a stopped run then has nothing to resume."""
    async_save: bool = False
    """Write checkpoints in a background thread (DCP async_save) while training goes on; a save is
    published (manifest, rename, pruning) when the next one starts or the run ends."""

    def __post_init__(self) -> None:
        check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        check(self.resume in ("auto", "never"), "checkpoint.resume", self.resume, "must be auto or never")
        check(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass(kw_only=True)
class EngineConfig:
    """What every engine's config has; each engine's own config derives from it (``NativeEngine.Config``,
    ``DeepSpeedEngine.Config``, launch/engines/) and holds that engine's knobs and their checks."""

    name: str
    """The engine (launch/engines/ registry): native (this trainer's own step and DCP checkpoints) |
    deepspeed (a DeepSpeed engine with ZeRO; needs the ``[deepspeed]`` extra). Chosen with ``engine=<name>``."""


@dataclass
class JobConfig:
    """The validated, typed form of the whole composed config."""

    model: ModelConfig
    router: RouterConfig
    experts: ExpertsConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    parallel: ParallelConfig
    engine: EngineConfig


def conf_dir() -> str:
    """Absolute path of the repository's ``conf/`` folder."""
    return str(Path(__file__).resolve().parent.parent / "conf")


def validate_job(job: JobConfig) -> None:
    """Rules that span the groups defined here and the model's (the chosen engine's own: its ``check_job``)."""
    m, e = job.model, job.experts
    job.router.check_num_experts(m.num_experts)
    expert_backend(e.backend).check_shapes(m.d_model, m.d_ff)
    check(job.train.seq_len <= m.max_seq_len, "train.seq_len", job.train.seq_len, f"must be <= model.max_seq_len ({m.max_seq_len})")
    sep = job.data.doc_separator
    if sep is not None:
        check(0 <= sep < m.vocab_size, "data.doc_separator", sep, f"must be a token id in [0, model.vocab_size={m.vocab_size})")
    if job.data.name == "stdlib_bytes":
        check(m.vocab_size >= 256, "model.vocab_size", m.vocab_size, "must be >= 256 for data=stdlib_bytes (bytes)")
    if job.optim.master_weights:
        check_master_weights(job)


def check_master_weights(job: JobConfig) -> None:
    """``optim.master_weights=true``'s rules across groups (the engine's: ``check_job``; the resolved precision: at start-up)."""
    from parallel.modes import names_where, parallel_mode

    tr = job.train
    check(tr.precision != "fp32", "train.precision", tr.precision, "must be bf16 (or auto on a GPU) with optim.master_weights=true "
          "(the expert weights are held in bf16 for bf16 GEMMs)")
    check(tr.grad_accum == 1, "train.grad_accum", tr.grad_accum, "must be 1 with optim.master_weights=true (the expert gradients are "
          "bf16 and the micro-batches' gradients would be summed in bf16)")
    single = names_where(lambda mode: not mode.distributed)
    check(not parallel_mode(job.parallel.mode).distributed, "parallel.mode", job.parallel.mode,
          f"must be {'|'.join(single)} with optim.master_weights=true (other layouts are not supported yet)")
    evolve = getattr(job.router, "evolve", None)
    check(evolve is None or not evolve.enabled, "router.evolve.enabled", True, "must be false with optim.master_weights=true (EvoMoE's "
          "spawn rewrites the expert weights outside the optimizer, which holds their masters)")
