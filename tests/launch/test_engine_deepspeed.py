"""``engine=deepspeed`` against ``engine=native``: same losses and weights on 2 gloo ranks, exact resume, refusals.

The multi-rank tests run ``launch.train.train`` itself on 2 CPU ranks (``run_distributed``: the
torchrun variables, gloo): 10 steps of a small model under DeepSpeed ZeRO 0, 1 and 2 must give the
per-step losses, gradient norms and final weights of native ``parallel=ddp`` within 1e-4, and a
run resumed from its step-5 checkpoint must continue exactly as the run that was not interrupted.
They skip only when deepspeed is not importable (CI installs the ``[deepspeed]`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from launch.config import JobConfig, conf_dir
from launch.deepspeed_launcher import from_deepspeed_launcher
from launch.engines import ENGINES, engine_class
from launch.engines.deepspeed import DeepSpeedEngine, ds_config
from launch.job import register_schemas, to_job_config
from launch.run_dir import register_resolvers
from moe.errors import ConfigError
from tests.parallel import dist_harness
from tests.parallel.dist_harness import free_port, run_distributed

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
SMALL = ["model.num_layers=2", "model.d_model=64", "model.d_ff=64", "model.dense_d_ff=128", "model.num_experts=4",
         "train.batch_size=8", "train.seq_len=64", "logging=none", "train.threads=1", "data.max_bytes=400000",
         f"train.steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}", "optim.warmup_steps=3", "router.jitter=0.1"]
TOL = 1e-4
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install -e '.[deepspeed]' with DS_BUILD_OPS=0)")


def job_of(*overrides: str) -> JobConfig:
    """The validated job of ``conf/train.yaml`` with ``overrides`` (Hydra compose, as ``launch.train`` does)."""
    register_resolvers()
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return to_job_config(compose("train", [*overrides, "checkpoint.dir=unused"]))


# ------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize(("overrides", "keys"), [
    (["engine=deepspeed", "parallel=ep"], ["engine.zero_stage (0)", "must be 1 or 2", "parallel=ep", "averages the ranks' local gradient norms"]),
    (["engine=deepspeed", "parallel=ep", "engine.zero_stage=2", "parallel.dense=fsdp"], ["parallel.dense ('fsdp')", "engine.name=deepspeed"]),
    (["engine=deepspeed", "parallel=fssdp"], ["parallel.mode ('fssdp')", "engine.name=deepspeed"]),
    (["engine=deepspeed", "parallel=fsdp"], ["parallel.mode ('fsdp')", "engine.name=deepspeed"]),
    (["engine=deepspeed"], ["parallel.mode ('none')", "engine.name=deepspeed"]),
    (["engine=deepspeed", "parallel=ddp", "engine.zero_stage=3"], ["engine.zero_stage (3)", "ZeRO-3"]),
    (["parallel=ddp", "engine.name=deepspeed"], ["engine.name ('deepspeed')", "NativeConfig", "engine=deepspeed"]),
    (["engine=deepspeed", "parallel=ddp", "train.on_nonfinite=skip"], ["train.on_nonfinite ('skip')", "engine.name=deepspeed"]),
    (["engine=deepspeed", "parallel=ddp", "optim.moments_dtype=bf16"], ["optim.moments_dtype ('bf16')", "must be fp32", "engine.name=deepspeed"]),
    (["engine=deepspeed", "parallel=ddp", "checkpoint.async_save=true"], ["checkpoint.async_save (True)", "engine.name=deepspeed"]),
    (["engine.name=megatron"], ["engine.name ('megatron')", "native", "deepspeed"]),
])
def test_unsupported_combinations_are_refused_naming_the_keys(overrides: list[str], keys: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        job_of(*overrides)
    for key in keys:
        assert key in str(err.value), (key, str(err.value))


def test_a_knob_of_another_engine_is_refused_when_composing() -> None:
    """Each engine owns its config: ``zero_stage`` is DeepSpeed's, so the native engine's schema has no such key."""
    with pytest.raises(Exception, match=r"Could not override 'engine\.zero_stage'"):
        job_of("parallel=ddp", "engine.zero_stage=1")


def test_registry_and_deepspeed_config_from_the_groups() -> None:
    assert sorted(ENGINES) == ["deepspeed", "native"]
    assert engine_class("deepspeed") is DeepSpeedEngine
    job = job_of("engine=deepspeed", "parallel=ddp", "engine.zero_stage=2", "train.batch_size=24", "train.grad_accum=3", "optim.grad_clip=0.5")
    cfg = ds_config(job, world_size=2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (24, 4, 3)
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": False}  # bf16 is the trainer's autocast; DeepSpeed keeps fp32 weights


def test_deepspeed_launcher_arguments_and_environment() -> None:
    env = {"LOCAL_SIZE": "4", "LOCAL_RANK": "1"}
    argv = ["launch/train.py", "--local_rank=1", "engine=deepspeed", "--local_rank", "1", "parallel=ddp"]
    assert from_deepspeed_launcher(argv, env) == ["launch/train.py", "engine=deepspeed", "parallel=ddp"]
    assert env["LOCAL_WORLD_SIZE"] == "4"
    env = {"LOCAL_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert from_deepspeed_launcher(["x", "train.steps=3"], env) == ["x", "train.steps=3"] and env["LOCAL_WORLD_SIZE"] == "2"


# ---------------------------------------------------------------------------------- 2 gloo ranks


def dist_harness_target(run_dir: str, overrides: list[str]) -> None:
    """One rank of ``run``: compose the job and train (the harness set the torchrun variables)."""
    from launch.train import train  # noqa: PLC0415  (imported in the rank process)

    job = job_of(*overrides)
    job.checkpoint.dir = str(Path(run_dir) / "ckpt")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    train(job, Path(run_dir))


def run(run_dir: Path, *overrides: str) -> list[dict[str, Any]]:
    """``launch.train.train`` on 2 fresh gloo ranks into ``run_dir``; its ``metrics.jsonl`` rows.

    Fresh ranks for every run: DeepSpeed keeps its process groups in module globals, made for one
    training run per process (as under torchrun), so a reused rank would hand it a destroyed group.
    """
    dist_harness._close_all()
    run_distributed(dist_harness_target, 2, str(run_dir), [*SMALL, "parallel=ddp", *overrides], timeout_s=240)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_step(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def assert_steps_match(rows: list[dict[str, Any]], want_rows: list[dict[str, Any]], steps: int, label: str, against: str) -> None:
    """Loss, gradient norm and lr logged at every step 1..``steps``, each within TOL of ``want_rows``'s
    (prints the largest gap per key, as ``label: max |key - against|``)."""
    for key in ("loss", "grad_norm", "lr"):
        got, want = per_step(rows, key), per_step(want_rows, key)
        assert sorted(got) == list(range(1, steps + 1))
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=TOL, abs=TOL), f"{key} at step {s}: {got[s]} vs {want[s]}"
        print(f"{label}: max |{key} - {against}| over {steps} steps = {max(abs(got[s] - want[s]) for s in got):.3g}")


def native_weights(ckpt: Path, job: JobConfig) -> dict[str, torch.Tensor]:
    """The model weights of a native (DCP) checkpoint, loaded in this process."""
    from launch.checkpoint import load_checkpoint  # noqa: PLC0415
    from launch.engines.native import training_state  # noqa: PLC0415
    from launch.optim import build_optimizer  # noqa: PLC0415
    from moe.model import MoETransformer  # noqa: PLC0415
    from parallel import Runtime  # noqa: PLC0415

    model = MoETransformer(job.model, job.router, job.experts)
    optimizer, scheduler = build_optimizer(model, job)
    state = training_state(model, optimizer, scheduler, Runtime(), {})
    rng = torch.get_rng_state()
    load_checkpoint(ckpt, state, Runtime())
    torch.set_rng_state(rng)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def deepspeed_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model weights DeepSpeed saved (``mp_rank_00_model_states.pt``, written by this test's run)."""
    return torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def native_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    d = tmp_path_factory.mktemp("native_ddp")
    rows = run(d)
    return rows, native_weights(d / "ckpt" / f"step_{STEPS:08d}", job_of(*SMALL))


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_ten_steps_match_native_ddp(stage: int, native_ddp: tuple[list[dict[str, Any]], dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """Losses, gradient norms (read before DeepSpeed's step) and final weights within 1e-4 of native ddp."""
    want_rows, want_weights = native_ddp
    rows = run(tmp_path, "engine=deepspeed", f"engine.zero_stage={stage}")
    assert_steps_match(rows, want_rows, STEPS, f"zero_stage={stage}", "native ddp")
    assert per_step(rows, "val_loss")[STEPS] == pytest.approx(per_step(want_rows, "val_loss")[STEPS], abs=TOL)
    assert want_rows[-1]["loss"] < want_rows[0]["loss"] - 0.1  # it trained: equality of two frozen runs would prove nothing
    ckpt = tmp_path / "ckpt" / f"step_{STEPS:08d}"
    assert json.loads((ckpt / "moeforge.json").read_text())["engine"] == {"name": "deepspeed", "zero_stage": stage}
    diff = max_diff(deepspeed_weights(ckpt), want_weights)
    print(f"zero_stage={stage}: max |weight - native ddp| = {diff:.3g}")
    assert diff < TOL


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize(("precision", "tol"), [("fp32", TOL), ("bf16", 2e-3)])
def test_accumulation_matches_native_ddp(precision: str, tol: float, tmp_path: Path) -> None:
    """``train.grad_accum=2`` (DeepSpeed told the accumulation boundary) under ZeRO 2, fp32 and bf16 autocast.

    bf16: the two engines sum the ranks' fp32 gradients in a different order (DeepSpeed divides
    before its all-reduce), and bf16 rounding of the slightly different weights grows that to a
    few 1e-4 in the loss by step 4, hence the looser bound.
    """
    knobs = ["train.steps=4", "train.eval_every=4", "train.grad_accum=2", f"train.precision={precision}"]
    want = run(tmp_path / "native", *knobs)
    got = run(tmp_path / "ds", *knobs, "engine=deepspeed", "engine.zero_stage=2")
    for key in ("loss", "grad_norm"):
        a, b = per_step(got, key), per_step(want, key)
        assert sorted(a) == [1, 2, 3, 4]
        for s in a:
            assert a[s] == pytest.approx(b[s], rel=tol, abs=tol), f"{key} at step {s}: {a[s]} vs {b[s]}"


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_resume_from_step_5_equals_the_uninterrupted_run(stage: int, tmp_path: Path) -> None:
    common = ["engine=deepspeed", f"engine.zero_stage={stage}", "checkpoint.every=5"]
    straight = run(tmp_path / "straight", *common)
    crashed = tmp_path / "crashed"
    (crashed / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "ckpt" / "step_00000005", crashed / "ckpt" / "step_00000005")
    resumed = run(crashed, *common)
    assert min(per_step(resumed, "loss")) == 6  # it resumed after step 5 instead of starting over
    for key in ("loss", "grad_norm", "lr"):
        want = per_step(straight, key)
        for s, value in per_step(resumed, key).items():
            assert value == pytest.approx(want[s], rel=1e-6, abs=1e-7), f"{key} at step {s}: {value} vs {want[s]}"
    a = deepspeed_weights(tmp_path / "straight" / "ckpt" / f"step_{STEPS:08d}")
    b = deepspeed_weights(crashed / "ckpt" / f"step_{STEPS:08d}")
    assert max_diff(a, b) == 0.0


@needs_deepspeed
@pytest.mark.slow
def test_resume_refuses_a_native_checkpoint(tmp_path: Path) -> None:
    """A native DCP checkpoint is not DeepSpeed's: named, and the run stops rather than silently starting over."""
    (tmp_path / "ckpt").mkdir()
    native_dir = tmp_path / "native"
    run(native_dir, "train.steps=2", "checkpoint.every=2")
    shutil.copytree(native_dir / "ckpt" / "step_00000002", tmp_path / "ckpt" / "step_00000002")
    with pytest.raises(AssertionError, match="written by engine=native"):
        run(tmp_path, "engine=deepspeed", "train.steps=4")


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks(tmp_path: Path) -> None:
    """``deepspeed --num_gpus 2 --module launch.train``: its ``--local_rank=N`` argument and ``LOCAL_SIZE`` are handled."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MOEFORGE_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2", f"--master_port={free_port()}",
           "--module", "launch.train", *SMALL, "train.steps=3", "engine=deepspeed", "parallel=ddp", "engine.zero_stage=1",
           f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(per_step(rows, "loss")) == [1, 2, 3]
    assert json.loads((tmp_path / "checkpoints" / "step_00000003" / "moeforge.json").read_text())["world_size"] == 2
