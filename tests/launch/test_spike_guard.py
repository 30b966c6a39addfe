"""Loss-spike guard: the robust statistic, the settle-time decision, and rollback with a data skip end to end.

End to end, an injected spike under ``train.on_spike=rollback`` must leave the same final weights
(SHA-256 of every DCP shard, from the manifests) as a run resumed from the same checkpoint and told
in advance to skip the same batches (``train.data_skips``), in 1 process and on 2 gloo ranks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.spike_guard import SpikeGuard, batch_index, spike_limit
from parallel import Runtime

REPO = Path(__file__).resolve().parents[2]


def test_spike_limit_is_median_plus_k_robust_sigmas() -> None:
    window = [5.0, 5.2, 4.9, 5.1, 9.0]  # median 5.1; |deviations| 0.1 0.1 0.2 0 3.9 -> MAD 0.1
    median, limit = spike_limit(window, 6.0)
    assert median == 5.1 and limit == pytest.approx(5.1 + 6 * 1.4826 * 0.1)
    median, limit = spike_limit([2.0, 2.0, 2.0], 6.0)  # MAD 0: the floor of 1% of the median
    assert median == 2.0 and limit == pytest.approx(2.0 + 6 * 0.02)


def feed(guard: SpikeGuard, losses: list[float], norms: list[float] | None = None) -> None:
    for i, loss in enumerate(losses):
        guard.record(i + 1, torch.tensor(loss, dtype=torch.float64), torch.tensor(1.0 if norms is None else norms[i]))


def test_settle_finds_the_spike_and_keeps_it_out_of_the_window() -> None:
    guard = SpikeGuard(Runtime(), "rollback", window=6, threshold=6.0, nonfinite_rollback=False)
    feed(guard, [3.0, 2.9, 2.95, 3.05, 2.9, 3.0, 8.0, 3.0])
    event = guard.settle()
    assert event is not None and event.step == 7 and event.loss == 8.0 and event.median == 2.975
    assert [s for s, _ in guard.losses] == [1, 2, 3, 4, 5, 6]  # the spike never entered the statistic
    assert guard.in_spike_window(12) == [7, 8.0, 0] and guard.in_spike_window(13) is None
    assert guard.state(12)["in_spike_window"] and guard.pending == []


def test_warn_only_reports_and_a_falling_loss_is_never_a_spike() -> None:
    guard = SpikeGuard(Runtime(), "warn", window=8, threshold=6.0, nonfinite_rollback=False)
    feed(guard, [5.5 - 0.1 * i for i in range(30)])
    assert guard.settle() is None and guard.warned == []
    feed(guard, [2.6] * 4 + [50.0])
    assert guard.settle() is None and [e.step for e in guard.warned] == [5]


def test_nonfinite_calls_for_a_rollback_only_under_on_nonfinite_rollback() -> None:
    for nonfinite_rollback in (False, True):
        guard = SpikeGuard(Runtime(), "warn", window=4, threshold=6.0, nonfinite_rollback=nonfinite_rollback)
        feed(guard, [3.0, 3.0, 3.0], norms=[1.0, math.inf, 1.0])
        event = guard.settle()
        assert (event is not None and event.nonfinite and event.step == 2) == nonfinite_rollback
        assert guard.in_spike_window(3) is not None  # either way a checkpoint saved now is inside a spike window


def test_batch_index_adds_every_skip_from_its_step_on() -> None:
    skips = [[6, 3], [10, 100]]
    assert [batch_index(s, skips) for s in (0, 5, 6, 9, 10, 11)] == [0, 5, 9, 12, 113, 114]


# ----------------------------------------------------------------------------------------- end to end

SMALL = ["model.num_layers=2", "model.d_model=64", "model.d_ff=64", "model.dense_d_ff=128", "model.num_experts=4",
         "train.batch_size=8", "train.seq_len=64", "logging=none", "train.threads=1", "data.max_bytes=400000",
         "train.steps=16", "checkpoint.every=2", "train.log_every=2", "train.eval_every=16", "checkpoint.keep=20",
         "train.spike_window=4"]


def run(run_dir: Path, *overrides: str, fault: dict | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOEFORGE_FAULT": json.dumps(fault or {}), "MOEFORGE_DEVICE": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MOEFORGE_RUN_ID"):
        env.pop(key, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "tests.faults.inject" if fault else "launch.train", f"hydra.run.dir={run_dir}", *SMALL, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def shard_digests(checkpoint: Path) -> dict[str, str]:
    files = json.loads((checkpoint / "moeforge.json").read_text())["files"]
    digests = {name: f["sha256"] for name, f in files.items() if name.endswith(".distcp") or name.startswith("rng_rank")}
    assert digests
    return digests


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_rollback_equals_a_run_told_to_skip_the_same_batches(tmp_path: Path, nproc: int) -> None:
    """Spike injected at step 11, seen at the step-12 log: the newest checkpoint at least 4 steps
    older (step 6) is reloaded, steps 8 and 10 are deleted, 3 batches are skipped from step 7."""
    mode = ["parallel=ddp"] if nproc > 1 else []
    spiky = tmp_path / "spiky"
    out = run(spiky, *mode, "train.on_spike=rollback", "train.skip_batches=3", fault={"spike_step": 11, "factor": 10.0}, nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "rolled back" in line]
    assert len(lines) == 1 and "loss spike at step 11" in lines[0] and "rolled back to step_00000006" in lines[0]
    assert "skipping 3 batches (6..8) from step 7" in lines[0] and "step_00000010, step_00000008" in lines[0]
    rows = [json.loads(line) for line in (spiky / "metrics.jsonl").read_text().splitlines()]
    rollback_rows = [r for r in rows if "rollback/spike_step" in r]
    assert len(rollback_rows) == 1 and rollback_rows[0]["step"] == 6 and rollback_rows[0]["rollbacks"] == 1
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12, 14, 16] and rows[-1]["rollbacks"] == 1

    told = tmp_path / "told"
    (told / "checkpoints").mkdir(parents=True)
    # the step-6 checkpoint as the spiky run wrote it before the spike (identical: same seed, same steps)
    shutil.copytree(spiky / "checkpoints" / "step_00000006", told / "checkpoints" / "step_00000006")
    out = run(told, *mode, "train.data_skips=[[6,3]]", nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "rolled back" not in out.stderr
    assert shard_digests(spiky / "checkpoints" / "step_00000016") == shard_digests(told / "checkpoints" / "step_00000016")
    # and the skip changed the run: without it the weights differ
    plain = tmp_path / "plain"
    (plain / "checkpoints").mkdir(parents=True)
    shutil.copytree(spiky / "checkpoints" / "step_00000006", plain / "checkpoints" / "step_00000006")
    assert run(plain, *mode, nproc=nproc).returncode == 0
    assert shard_digests(plain / "checkpoints" / "step_00000016") != shard_digests(told / "checkpoints" / "step_00000016")


@pytest.mark.slow
def test_max_rollbacks_gives_up_in_one_line(tmp_path: Path) -> None:
    out = run(tmp_path, "train.on_spike=rollback", "train.max_rollbacks=0", fault={"spike_step": 11})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "moeforge: error:" in line]
    assert len(errors) == 1 and "loss spike at step 11" in errors[0] and "train.max_rollbacks=0" in errors[0]


@pytest.mark.slow
def test_diverged_checkpoints_are_never_resumed_under_rollback(tmp_path: Path) -> None:
    """``optim.lr=1e6 checkpoint.every=1``: step 2's gradient norm is already Inf. With
    ``on_nonfinite=skip`` the run goes on to step 6, saving checkpoints inside the spike window;
    the rerun at a sane learning rate under rollback never trains from them and says in one
    line that nothing older exists (the stop-policy run, which keeps only step 1, likewise)."""
    common = ["train.steps=6", "checkpoint.every=1", "train.log_every=1", "train.spike_window=50", "checkpoint.keep=3"]
    bad = run(tmp_path, *common, "optim.lr=1e6", "train.on_nonfinite=skip")
    assert bad.returncode == 0, bad.stderr[-2000:]
    ck = tmp_path / "checkpoints"
    saved = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
    assert saved == ["step_00000004", "step_00000005", "step_00000006"]
    for name in saved:
        assert json.loads((ck / name / "moeforge.json").read_text())["loss_window"]["in_spike_window"] is True

    warned = run(tmp_path, *common, "train.steps=7", "train.on_nonfinite=skip")  # warn: resumes, but says so
    assert "resumed from a checkpoint inside a spike window" in warned.stderr and "step_00000006 was saved inside" in warned.stderr

    again = run(tmp_path, *common, "train.steps=12", "train.on_spike=rollback", "train.on_nonfinite=rollback")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    errors = [line for line in again.stderr.splitlines() if "moeforge: error:" in line]
    assert len(errors) == 1 and "nothing to roll back to" in errors[0] and "step 2: the loss" in errors[0], again.stderr[-2000:]
    assert "resumed from" in again.stderr  # loaded, then refused before any training step
    assert not [line for line in again.stderr.splitlines() if line.startswith("[") and "step 8/12" in line]

    fresh = tmp_path / "fresh"
    assert run(fresh, *common, "optim.lr=1e6").returncode == 2  # on_nonfinite=stop: only step 1 is kept
    rerun = run(fresh, *common, "train.on_spike=rollback", "train.on_nonfinite=rollback")
    errors = [line for line in rerun.stderr.splitlines() if "moeforge: error:" in line]
    assert rerun.returncode == 2 and len(errors) == 1 and "step 2: the loss" in errors[0] and "nothing to roll back to" in errors[0]


@pytest.mark.slow
def test_default_warn_run_raises_no_spike(tmp_path: Path) -> None:
    out = run(tmp_path, "train.steps=60", "train.spike_window=50", "train.eval_every=60", "checkpoint.every=60", "train.log_every=10")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss spike" not in out.stderr


def test_rollback_target_skips_newer_and_spike_window_checkpoints(tmp_path: Path) -> None:
    for step, inside in ((2, False), (4, True), (6, False), (8, False)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / "moeforge.json").write_text(json.dumps({"step": step, "loss_window": {"in_spike_window": inside}}))
    fails = {"step_00000006"}
    verify = lambda path, rt: ["broken"] if path.name in fails else []  # noqa: E731
    from launch.spike_guard import rollback_target

    assert rollback_target(tmp_path, 7, Runtime(), verify).name == "step_00000002"  # 6 fails, 4 is inside a window
    assert rollback_target(tmp_path, 8, Runtime(), verify).name == "step_00000008"
    assert rollback_target(tmp_path, 1, Runtime(), verify) is None


def test_record_reads_nothing_from_the_device_and_settle_reads_once() -> None:
    """The guard's per-step part adds no host sync (tools.bench.host_syncs); the read waits for settle."""
    from tools.bench.host_syncs import HostSyncCounter

    guard = SpikeGuard(Runtime(), "rollback", window=4, threshold=6.0, nonfinite_rollback=True, skips=[[2, 5]])
    with HostSyncCounter() as syncs:
        for step in range(1, 9):
            guard.record(step, torch.tensor(3.0) + step * 1e-3, torch.tensor(1.0))
            guard.batch_index(step)
    assert syncs.total == 0, syncs.describe()
    with HostSyncCounter() as syncs:
        assert guard.settle() is None
    assert syncs.total == 1, syncs.describe()
