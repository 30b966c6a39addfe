"""launch/pretrained.py: the public loader gives the trainer's own model, for one-process and EP-trained checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from launch.data import BatchSampler
from launch.engines import build_engine
from launch.job import manifest_of
from launch.pretrained import find_checkpoint, load_model, load_pretrained
from launch.train import VAL_SPLIT, evaluate, load_data
from moe.errors import CheckpointError
from moe.model import MoETransformer
from parallel import Runtime
from tests.launch.test_train import REPO, SMALL
from tools.hf.checkpoint import compose_job

RUN = [*SMALL, "train.steps=3", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "train.log_every=1",
       "checkpoint.keep=5", "checkpoint.every=2"]


def train(run_dir: Path, *extra: str, nproc: int = 1) -> None:
    env = {**os.environ, "MOEFORGE_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("MOEFORGE_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "launch.train", f"hydra.run.dir={run_dir}", *RUN, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def trainer_model(checkpoint: Path, *extra: str) -> MoETransformer:
    """The model ``launch.train`` holds after resuming from ``checkpoint`` in one process (its own resume path)."""
    job = compose_job([*RUN, *extra, f"checkpoint.dir={checkpoint.parent}"])
    runtime = Runtime()
    torch.manual_seed(job.train.seed)
    core = MoETransformer(job.model, job.router, job.experts)
    core.prepare(runtime.device)
    build_engine(job, core, runtime, manifest_of(job)).load(checkpoint)
    return core.eval()


def val_loss(model: MoETransformer, *extra: str) -> float:
    """``launch.train.evaluate`` of ``model`` on the run's validation batches, in one process."""
    job = compose_job([*RUN, *extra, "checkpoint.dir=unused"])
    data = load_data(job)
    sampler = BatchSampler(data.val, job.train.seq_len, job.train.batch_size, job.train.seed, 0, 1, VAL_SPLIT, split="validation")
    return evaluate(model, model, sampler, job, Runtime(), nullcontext())["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one_process", "ep2"])
def test_loaded_model_is_the_trainers_model(layout: str, tmp_path: Path) -> None:
    ep = ["parallel=ep", "parallel.ep_size=2"] if layout == "ep2" else []
    run = tmp_path / "run"
    train(run, *ep, nproc=2 if ep else 1)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    for step in (2, 3):
        checkpoint = run / "checkpoints" / f"step_{step:08d}"
        pre = load_pretrained(checkpoint)
        assert pre.step == step and pre.checkpoint == checkpoint and pre.config.optim.lr == 3e-3 and not pre.model.training
        with torch.no_grad():
            diff = (pre.model(x)[0] - trainer_model(checkpoint)(x)[0]).abs().max()
        assert float(diff) == 0.0, f"{layout} step {step}: {float(diff)}"
    lonely = tmp_path / "elsewhere" / "step_00000003"  # a checkpoint copied away from its run describes itself
    shutil.copytree(run / "checkpoints" / "step_00000003", lonely)
    assert "config.yaml" in json.loads((lonely / "moeforge.json").read_text())["files"]  # checksummed like every file
    with torch.no_grad():
        assert torch.equal(load_pretrained(lonely).model(x)[0], load_pretrained(run / "checkpoints" / "step_00000003").model(x)[0])
    pre = load_pretrained(run)  # a run directory: its newest checkpoint
    assert pre.step == 3 and load_pretrained(run / "checkpoints").step == 3
    half = load_pretrained(run, dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert float((half.model(x)[0].float() - pre.model(x)[0]).abs().max()) < 0.2
    summary = json.loads((run / "summary.json").read_text())
    # the trainer's own last evaluation (under ep: 2 ranks, experts split) on the loaded model, in one process
    assert val_loss(pre.model) == pytest.approx(summary["val_loss"], rel=1e-6 if ep else 0.0, abs=0.0)


def test_dtype_device_and_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="holds no published checkpoint"):
        find_checkpoint(tmp_path)


def test_a_checkpoint_of_another_engine_is_refused_naming_it(tmp_path: Path) -> None:
    """load_pretrained reads DCP checkpoints: a manifest naming engine=deepspeed is refused before any file is read."""
    (tmp_path / "moeforge.json").write_text(json.dumps({"format": 2, "engine": {"name": "deepspeed", "zero_stage": 1}, "files": {}}))
    with pytest.raises(CheckpointError, match="written by engine=deepspeed; load_pretrained reads native checkpoints"):
        load_model(tmp_path, None, None, None)  # type: ignore[arg-type]
