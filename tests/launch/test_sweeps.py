"""Hydra sweeps (``-m``): every job is a complete run of its own, and rerunning the sweep resumes each job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.throughput import TIMING_KEYS

from tests.launch.test_train import REPO, SMALL, launch, read_metrics

TINY = [*SMALL, "model.num_layers=1", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "train.log_every=1"]


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOEFORGE_DEVICE": "cpu"}
    env.pop("MOEFORGE_RUN_ID", None)
    cmd = [sys.executable, "-m", "launch.train", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def checkpoints(job_dir: Path) -> list[str]:
    return sorted(p.name for p in (job_dir / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_learning_rate_sweep_gives_independent_runs_that_resume(tmp_path: Path) -> None:
    out = sweep(tmp_path / "s", *TINY, "optim.lr=1e-3,3e-3", "train.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [tmp_path / "s" / "0", tmp_path / "s" / "1"]
    for job in jobs:
        assert summary(job)["step"] == 2 and checkpoints(job) == ["step_00000002"]
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "train_rank0.log").is_file()
    lrs = [json.loads((job / "checkpoints" / "step_00000002" / "objects.json").read_text()) for job in jobs]
    assert summary(jobs[0])["val_loss"] != summary(jobs[1])["val_loss"] and lrs[0] != lrs[1]
    # job 1 is exactly the run a plain launch with its overrides gives: nothing leaks between jobs
    alone = tmp_path / "alone"
    assert launch(alone, *TINY, "optim.lr=3e-3", "train.steps=2").returncode == 0
    assert untimed(read_metrics(alone)) == untimed(read_metrics(jobs[1]))

    again = sweep(tmp_path / "s", *TINY, "optim.lr=1e-3,3e-3", "train.steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    for job in jobs:
        assert f"resumed from {job / 'checkpoints' / 'step_00000002'} at step 2" in again.stderr
        assert summary(job)["step"] == 4 and summary(job)["resumed_at_step"] == 2
        assert [m["step"] for m in read_metrics(job) if "loss" in m] == [1, 2, 3, 4]
    assert again.stderr.count("train.steps: 2 -> 4") == 2  # each job says its directory held other overrides


@pytest.mark.slow
def test_router_sweep_runs_both_routers(tmp_path: Path) -> None:
    out = sweep(tmp_path / "s", *TINY, "router=topk,hash", "train.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    names = []
    for job in (tmp_path / "s" / "0", tmp_path / "s" / "1"):
        assert summary(job)["step"] == 2 and checkpoints(job) == ["step_00000002"]
        manifest = json.loads((job / "checkpoints" / "step_00000002" / "moeforge.json").read_text())
        names.append(manifest["router"]["name"])
    assert names == ["topk", "hash"]


@pytest.mark.slow
def test_submitit_launcher_sweep_keeps_every_point(tmp_path: Path) -> None:
    """The SLURM path of the README through Hydra's submitit plugin, with its local executor (no SLURM here)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = sweep(tmp_path / "s", *TINY, "hydra/launcher=submitit_local", "optim.lr=1e-3,3e-3", "train.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in out.stdout + out.stderr
    for job in (tmp_path / "s" / "0", tmp_path / "s" / "1"):
        assert summary(job)["step"] == 2 and checkpoints(job) == ["step_00000002"]
