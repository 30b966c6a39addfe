"""``engine=deepspeed``: the moeforge model, optimizer and schedule trained inside a DeepSpeed engine.

    .venv/bin/python -m launch.torchrun --standalone --nproc-per-node 8 -m launch.train engine=deepspeed engine.zero_stage=2 parallel=ddp
    deepspeed --num_gpus 8 --module launch.train engine=deepspeed engine.zero_stage=1 parallel=ddp
    .venv/bin/python -m launch.torchrun --standalone --nproc-per-node 8 -m launch.train engine=deepspeed engine.zero_stage=2 parallel=ep parallel.ep_size=4

What DeepSpeed gets (``deepspeed.initialize``): the plain ``MoETransformer``; the AdamW and
``LambdaLR`` of ``launch.optim.build_optimizer`` (the same param groups and hyperparameters as the
native engine: weight decay on matrices only); a config with ``train_batch_size`` =
``train.batch_size``, ``gradient_accumulation_steps`` = ``train.grad_accum`` (micro-batch = batch /
(ranks x accumulation)), ``gradient_clipping`` = ``optim.grad_clip``, ``zero_optimization.stage``
= ``engine.zero_stage`` (0, 1 or 2) and ``zero_allow_untested_optimizer`` (torch's AdamW under ZeRO).
DeepSpeed then averages gradients over all ranks, clips, steps the optimizer and the schedule.

Decisions, and why:

- **parallel=ddp: experts are not marked as DeepSpeed MoE parameters** (no ``allreduce=False`` /
  ``group_name``, no separate MoE param groups). DeepSpeed reduces a parameter marked that way
  over its expert-data-parallel group only; under ``parallel=ddp`` every rank holds every expert,
  so expert gradients must be all-reduced over all ranks exactly like dense ones, or ranks
  diverge. Unmarked, they are: and ZeRO 1/2 then shard the experts' optimizer state (and
  gradients) over all ranks like every other parameter.
- **parallel=ep: DeepSpeed's expert parallelism** (``launch/engines/deepspeed_moe.py``): DeepSpeed's
  expert-parallel and expert-data-parallel groups, experts marked as its MoE parameters and moved
  into its MoE optimizer groups, so ZeRO 1/2 partition them over their expert-data-parallel
  group; ZeRO 0 is refused (its clipping averages per-rank norms). ``fsdp`` and ``fssdp`` are
  refused (two owners of the same parameters), as is ZeRO-3 (``engine.zero_stage``: DeepSpeed
  refuses it with MoE).
- **Precision**: ``train.precision=bf16`` is the same bf16 autocast as the native engine (the
  trainer's ``autocast_for`` around the forward); DeepSpeed sees an fp32 model, so weights,
  gradients, their all-reduce and the optimizer state stay fp32 as ``train.precision`` documents.
  DeepSpeed's ``bf16.enabled`` (bf16 weights with fp32 master copies) is a different recipe and is
  not used.
- **Guard**: the gradient norm is read before DeepSpeed's step (ZeRO 0: from the all-reduced
  ``.grad``; ZeRO 1/2: ``scaled_global_norm`` of the reduced partitions), so a non-finite step stops
  before any update as in the native engine. ``train.on_nonfinite=skip`` is refused: DeepSpeed
  applies clip, update and schedule in one ``step`` that the trainer cannot half-apply.
- **Checkpoints**: DeepSpeed's own ``save_checkpoint`` files (module, optimizer and ZeRO partitions,
  LR schedule, the trainer counters as ``client_state``) plus each rank's RNG state, written into
  the native writer's ``step_N.tmp-<id>`` folder and published by ``CheckpointWriter.finish``: the
  same SHA-256 manifest (with ``engine: {name, zero_stage}``), fsync, atomic rename and pruning.
  A resume verifies every file before DeepSpeed reads it. ZeRO's per-rank partitions are not DCP
  tensors, so these checkpoints resume only under ``engine=deepspeed`` at the same ZeRO stage,
  ``parallel.mode`` and ``ep_size`` (recorded in the manifest) and (stage 1/2) the same number of
  ranks; each is refused with a message otherwise. DeepSpeed's
  files are pickles (``torch.load(weights_only=False)`` inside DeepSpeed): the checksums catch
  corruption, not tampering, so resume only checkpoints you wrote.
- **Launchers**: torchrun (``launch.torchrun``) as for every mode; the ``deepspeed`` launcher sets
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` too, and ``launch.deepspeed_launcher`` drops the
  ``--local_rank=N`` argument it appends and maps its ``LOCAL_SIZE`` to ``LOCAL_WORLD_SIZE``.

Known differences from ``parallel=ddp``: a parameter with no gradient on any rank (an expert no
token reached, EvoMoE's unspawned experts) gets a zero gradient from DeepSpeed, so AdamW still
moves it (decay, moments), where the native engine leaves it untouched. ``parallel.bucket_mb`` and
``parallel.overlap_grad_reduce`` are the native reducer's; DeepSpeed uses its own buckets.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from launch.checkpoint import (
    FORMAT,
    CheckpointWriter,
    PendingWrite,
    gather_objects,
    load_rng_state,
    loss_window_of,
    read_manifest,
    select_checkpoint,
    write_rng_state,
)
from launch.checksums import problems, share
from launch.config import EngineConfig, JobConfig
from launch.engines import checkpoint_engine
from launch.engines.deepspeed_moe import DeepSpeedExpertParallel
from launch.optim import MOMENTS_DTYPE, build_optimizer
from moe.errors import CheckpointError, MoeforgeError, SetupError, check
from parallel import Runtime
from parallel.modes import ParallelMode, names_where, parallel_mode

log = logging.getLogger("moeforge")

INSTALL = "pip install -e '.[deepspeed]' with DS_BUILD_OPS=0 (launch/setup_env.sh does)"


def _import_deepspeed(device: torch.device) -> Any:
    """``deepspeed``, on the accelerator of ``device`` (``DS_ACCELERATOR=cpu`` for CPU ranks)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as err:
        raise SetupError(f"engine=deepspeed needs the deepspeed package ({err}): {INSTALL}") from None
    if get_accelerator().device_name() != device.type:
        raise SetupError(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but this rank runs on {device.type!r}; "
                                f"set DS_ACCELERATOR={device.type} (MOEFORGE_DEVICE=cpu ranks need DS_ACCELERATOR=cpu)")
    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (minutes of C++) that only its
        # inference path calls; training reduces through torch.distributed (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def ds_config(job: JobConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config moeforge's groups map to (see the module docstring)."""
    tr = job.train
    return {
        "train_batch_size": tr.batch_size,
        "train_micro_batch_size_per_gpu": tr.batch_size // (world_size * tr.grad_accum),
        "gradient_accumulation_steps": tr.grad_accum,
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": {"stage": job.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


def runs_under_deepspeed(mode: ParallelMode) -> bool:
    """Whether DeepSpeed runs ``mode``: it needs a process group (one process included) and shards
    parameters itself (ZeRO), so a mode that shards and gathers them is not one it can run."""
    return mode.distributed and not mode.gathers_parameters


@dataclass(kw_only=True)
class DeepSpeedConfig(EngineConfig):
    """``engine=deepspeed``: needs the ``[deepspeed]`` extra and ``parallel=ddp``, or ``parallel=ep`` with
    ZeRO 1/2 for DeepSpeed's expert parallelism (``DeepSpeedEngine.check_job``)."""

    name: str = "deepspeed"
    zero_stage: int = 0
    """ZeRO stage for every parameter, experts included (over their expert-data-parallel group under
    ``parallel=ep``): 0 (replicated), 1 (optimizer state sharded), 2 (optimizer state and gradients
    sharded). Stage 3 is not supported."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2), "engine.zero_stage", self.zero_stage,
              "must be 0, 1 or 2 (ZeRO-3 is not supported: DeepSpeed refuses it for MoE models)")


class DeepSpeedEngine:
    """``engine=deepspeed``: a ``DeepSpeedEngine`` around the core model (ZeRO stage 0/1/2)."""

    Config = DeepSpeedConfig

    def __init__(self, job: JobConfig, core: nn.Module, runtime: Runtime, manifest: dict[str, Any]) -> None:
        deepspeed = _import_deepspeed(runtime.device)
        os.environ.setdefault("LOCAL_RANK", str(runtime.local_rank))  # DeepSpeed asserts it is set; one process has none
        self.job, self.runtime, self.stage = job, runtime, job.engine.zero_stage
        # Experts split over DeepSpeed's expert-parallel groups and marked as its MoE parameters (parallel=ep).
        self.ep = DeepSpeedExpertParallel(core, runtime) if parallel_mode(job.parallel.mode).splits_experts else None
        ep_size = self.ep.ep_size if self.ep else 1
        self.manifest = {**manifest, "engine": {"name": job.engine.name, "zero_stage": self.stage},
                         "parallel": {"mode": job.parallel.mode, "ep_size": ep_size}}
        runtime.install_count_sum(core)  # router.balance_scope=global: f counts every rank's tokens
        optimizer, scheduler = build_optimizer(core, job, regroup=self.ep.regroup if self.ep else None)
        if self.stage > 0:  # ZeRO re-points the groups at flat fp32 partitions and creates their state at step 1
            optimizer.state.clear()
        with self.ep.seen_as_deepspeed_moe() if self.ep else nullcontext():
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=core, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(job, runtime.world_size), dist_init_required=False,
            )
        self.model: nn.Module = self.ds

    @staticmethod
    def check_job(job: JobConfig) -> None:
        """Refuse what this engine does not run, naming ``engine.name`` and the other key."""
        p, tr = job.parallel, job.train
        check(not job.optim.master_weights, "optim.master_weights", job.optim.master_weights,
              "must be false with engine.name=deepspeed (DeepSpeed keeps its own fp32 partitions of every parameter; bf16 expert "
              "weights with fp32 masters are engine.name=native's)")
        mode, runs = parallel_mode(p.mode), names_where(runs_under_deepspeed)
        check(runs_under_deepspeed(mode), "parallel.mode", p.mode,
              f"must be {' or '.join(runs)} with engine.name=deepspeed (data parallelism over every rank, one process included, or DeepSpeed's "
              "expert parallelism; FSDP and FSSDP shard parameters themselves, which DeepSpeed's ZeRO does instead)")
        check(not mode.splits_experts or job.engine.zero_stage in (1, 2), "engine.zero_stage", job.engine.zero_stage,
              "must be 1 or 2 with engine.name=deepspeed and parallel=ep (DeepSpeed's stage-0 clipping averages the ranks' local "
              "gradient norms, which is wrong when ranks hold different experts)")
        check(not mode.splits_experts or not parallel_mode(p.dense).gathers_parameters, "parallel.dense", p.dense,
              "must be ddp with engine.name=deepspeed (DeepSpeed reduces the dense gradients itself)")
        check(not job.checkpoint.async_save, "checkpoint.async_save", job.checkpoint.async_save,
              "must be false with engine.name=deepspeed (DeepSpeed's checkpoint files are written synchronously)")
        check(MOMENTS_DTYPE[job.optim.moments_dtype] is torch.float32, "optim.moments_dtype", job.optim.moments_dtype,
              "must be fp32 with engine.name=deepspeed (DeepSpeed steps torch's AdamW over its own flat fp32 partitions; "
              "bf16 moments are engine.name=native's kernel)")
        check(tr.on_nonfinite == "stop", "train.on_nonfinite", tr.on_nonfinite,
              "must be stop with engine.name=deepspeed (DeepSpeed clips, updates and steps the schedule in one call, so a "
              "non-finite step cannot be skipped; it stops before the update)")

    def zero_grad(self) -> None:
        """Nothing: DeepSpeed's ``step`` releases the gradients it consumed."""

    def micro_batch(self, last: bool) -> AbstractContextManager[None]:
        """Tell DeepSpeed whether this backward ends the step (it reduces gradients only then)."""
        self.ds.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        """``engine.backward``: DeepSpeed divides by ``gradient_accumulation_steps`` (= ``micro_batches``)."""
        self.ds.backward(loss)

    def grad_norm(self) -> Tensor:
        """The reduced gradients' global L2 norm before clipping (DeepSpeed clips inside ``step``)."""
        if self.stage == 0:
            norms = [p.grad.detach().float().norm() for p in self.ds.module.parameters() if p.grad is not None]
            return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.runtime.device)
        norm = torch.as_tensor(self.ds.optimizer.scaled_global_norm(), dtype=torch.float32, device=self.runtime.device)
        return torch.where(norm < 0, torch.full_like(norm, float("inf")), norm)  # DeepSpeed reports inf/NaN as -1

    def step(self, ok: Tensor) -> None:
        """DeepSpeed clips, updates and steps the schedule in one call that cannot take a device flag, so this
        engine reads ``ok`` on the host (one sync per step) and does not step a non-finite step; the trainer's
        guard then stops the run (``train.on_nonfinite=stop``, the only policy allowed here)."""
        if bool(ok):
            self.ds.step()

    def checkpoint_writer(self) -> CheckpointWriter:
        c = self.job.checkpoint
        return DeepSpeedCheckpointWriter(c.dir, self.runtime, c.keep, self.manifest, self.ds, self.ep)

    def save(self, writer: CheckpointWriter, step: int, trainer: dict[str, Any]) -> Path | None:
        return writer.save(step, {"trainer": trainer})

    def select_checkpoint(self) -> Path | None:
        """The newest published checkpoint in ``checkpoint.dir`` written by this engine whose files all verify."""
        return select_checkpoint(self.job.checkpoint.dir, self.runtime, verify_deepspeed_checkpoint, " for engine=deepspeed")

    def verify(self, path: Path) -> list[str]:
        return verify_deepspeed_checkpoint(path, self.runtime)

    def load(self, path: Path) -> dict[str, Any]:
        """DeepSpeed's ``load_checkpoint`` (module, optimizer/ZeRO partitions, schedule), then this rank's RNG."""
        saved = read_manifest(path)
        if self.stage > 0 and saved.get("world_size") != self.runtime.world_size:
            raise CheckpointError(f"checkpoint {path} holds ZeRO-{self.stage} partitions of {saved.get('world_size')} ranks but this run has "
                                  f"{self.runtime.world_size}; resume with the same number of ranks (or engine.zero_stage=0 checkpoints)")
        loaded, client = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None or "moeforge" not in client:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it")
        if self.ep is not None:  # the module file held rank 0's experts; the ZeRO partitions hold everyone's
            self.ds.optimizer.update_lp_params()
        # The schedule's position is restored; put each group's lr where that position says.
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.scheduler.last_epoch)
        load_rng_state(path, self.runtime)
        return client["moeforge"]["trainer"]


class DeepSpeedCheckpointWriter(CheckpointWriter):
    """``CheckpointWriter`` whose files are DeepSpeed's ``save_checkpoint`` output (published the same way)."""

    def __init__(self, directory: str | Path, runtime: Runtime, keep: int, manifest: dict[str, Any], ds: Any,
                 ep: DeepSpeedExpertParallel | None = None) -> None:
        super().__init__(directory, runtime, keep, manifest, async_save=False)
        self.ds, self.ep = ds, ep

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Refuse NaN/Inf weights, write DeepSpeed's files and this rank's RNG into a fresh tmp folder, publish.

        ``state``: ``{"trainer": counters}``, stored as DeepSpeed's ``client_state``.
        """
        self.finish()
        self.refuse_nonfinite(step, {"model": dict(self.ds.module.named_parameters())})
        need = self.check_space(step)
        tmp = self.fresh_tmp(step, need)
        self.run_agreed(lambda: write_rng_state(tmp, self.runtime), step, tmp, need)
        try:
            self.ds.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state={"moeforge": state}, save_latest=False)
            if self.ep is not None:
                self.ep.save_expert_weights(tmp)
        except Exception as err:
            raise self.write_failed(err, step, tmp, need) from None
        return self.publish(PendingWrite(step, tmp, None, need, loss_window_of(state)))


def verify_deepspeed_checkpoint(path: Path, runtime: Runtime) -> list[str]:
    """Problems with DeepSpeed checkpoint ``path`` (empty when it verifies); the same list on every rank.

    The manifest must be this format and say ``engine.name: deepspeed``; every listed file must have
    its size and SHA-256 (each rank hashes a share).
    """
    found: list[str] = []
    try:
        manifest = read_manifest(path)
        engine = checkpoint_engine(manifest)
        if engine != DeepSpeedConfig.name:
            raise CheckpointError(f"it was written by engine={engine}; engine=deepspeed resumes only its own checkpoints")
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"its manifest is not format {FORMAT} with a file list")
        files = manifest["files"]
        found += problems(path, files, share(list(files), runtime.rank, runtime.world_size))
    except CheckpointError as err:
        found.append(str(err))
    return sorted({p for part in gather_objects(found, runtime) for p in part})
