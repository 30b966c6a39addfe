"""Fault injection through ``python -m launch.train``: kills mid-save, corrupt files, NaN, signals, two writers.

Every run uses the small model of ``tests/launch/test_train.py`` on the embedded byte corpus; an
uninterrupted run of the same command is the reference, and a run that was interrupted and
resumed must log exactly the same rows (losses, grad norms, routing statistics, validation loss),
once per step. Faults come from ``tests/faults/inject.py``; the trainer has no test hooks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checks import assert_same_record, newest_verified_step, nonfinite_in_checkpoints, rows
from tests.faults.procs import running, wait_for_metrics
from tests.launch.test_train import SMALL, launch

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = [*SMALL, f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=4", "checkpoint.every=1", "checkpoint.keep=2",
          "router.jitter=0.1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The uninterrupted run (its directory and its metrics rows)."""
    d = tmp_path_factory.mktemp("reference")
    out = launch(d, *COMMON)
    assert out.returncode == 0, out.stderr[-3000:]
    return d, rows(d)


# Kill -9 inside checkpoint saves, one per launch; each launch resumes where the previous one was killed.
# With checkpoint.every=1 and keep=2, a launch's first save is of the step after the newest checkpoint.
KILL_CHAIN = [
    {"kill_save": 2, "op": 1},                  # the first operation of a save
    {"kill_save": 1, "at": "write __0_0", "nth": 100},  # a torn write in the middle of the shard
    {"kill_save": 1, "at": ".metadata"},        # DCP's metadata being written
    {"kill_save": 2, "at": "moeforge.json"},    # the manifest being written
    {"kill_save": 1, "at": "-> step_"},         # just before the publishing rename
    {"kill_save": 1, "at": ".del-"},            # published; pruning not started
    {"kill_save": 1, "at": ".del-", "nth": 2},  # pruning: files deleted, folder left
    {"kill_save": 2, "fraction": 0.25},         # a torn write again, further on
]


def test_kill_chain_loses_nothing_and_resumes_to_the_same_losses(tmp_path: Path, reference: tuple[Path, list]) -> None:
    ckpt = tmp_path / "checkpoints"
    newest = 0
    kills = 0
    for fault in KILL_CHAIN:
        out = launch(tmp_path, *COMMON, fault=fault)
        assert out.returncode == -signal.SIGKILL, (fault, out.stderr[-3000:])
        kills += 1
        after = newest_verified_step(ckpt)
        assert after is not None and after >= newest, f"kill {kills} ({fault}): newest verified {after}, was {newest}"
        newest = after
    assert kills == len(KILL_CHAIN) and newest >= 4
    final = launch(tmp_path, *COMMON)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr
    assert_same_record(rows(tmp_path), reference[1])
    assert sorted(p.name for p in ckpt.iterdir() if p.name != "moeforge.lock") == ["step_00000007", "step_00000008"]


def test_async_checkpoints_give_the_same_run_and_survive_a_kill(tmp_path: Path, reference: tuple[Path, list]) -> None:
    # Save 4 first publishes step 3 (manifest, rename, pruning step 1), then stages step 4, whose shards
    # DCP writes in its background thread: operation 25 is one of those writes.
    killed = launch(tmp_path, *COMMON, "checkpoint.async_save=true", fault={"kill_save": 4, "op": 25})
    assert killed.returncode == -signal.SIGKILL
    assert newest_verified_step(tmp_path / "checkpoints") == 3
    assert len(list((tmp_path / "checkpoints").glob("step_00000004.tmp-*"))) == 1
    out = launch(tmp_path, *COMMON, "checkpoint.async_save=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_record(rows(tmp_path), reference[1])
    assert newest_verified_step(tmp_path / "checkpoints") == STEPS


def test_random_bytes_in_a_shard_fall_back_to_the_previous_checkpoint(tmp_path: Path, reference: tuple[Path, list]) -> None:
    shutil.copytree(reference[0] / "checkpoints", tmp_path / "checkpoints", ignore=shutil.ignore_patterns("moeforge.lock"))
    shard = tmp_path / "checkpoints" / "step_00000008" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[20_000:24_096] = os.urandom(4096)
    shard.write_bytes(bytes(data))
    out = launch(tmp_path, *COMMON)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"moeforge: checkpoint {shard.parent} failed verification: __0_0.distcp does not match its SHA-256 (contents changed); "
            f"trying the next older one") in out.stderr
    assert "resumed from" in out.stderr and "step_00000007 at step 7" in out.stderr
    assert_same_record(rows(tmp_path), [r for r in reference[1] if r["step"] == STEPS])
    assert newest_verified_step(tmp_path / "checkpoints") == STEPS  # the corrupt one was replaced by a good one


def test_huge_lr_never_saves_nan_and_says_what_to_do(tmp_path: Path) -> None:
    """Step 1's update already blows the weights up (step 2: loss 1e17, gradient norm inf): nothing after
    step 1 is saved, and a rerun with a sane lr uses it, and says the resumed weights are the problem."""
    out = launch(tmp_path, *SMALL, "train.steps=4", "optim.lr=1e6", "checkpoint.every=1", "train.log_every=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "step 2: loss 1.028e+17, gradient norm inf (rank 0) is not finite; stopped before the optimizer step" in out.stderr
    assert nonfinite_in_checkpoints(tmp_path / "checkpoints") == {"step_00000001": []}
    again = launch(tmp_path, *SMALL, "train.steps=4", "optim.lr=1e-4", "checkpoint.every=1", "train.log_every=1")
    assert again.returncode == 2 and "optim.lr: 1000000.0 -> 0.0001" in again.stderr
    assert "whose weights may already have diverged: start over with checkpoint.resume=never" in again.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_nan_step_stops_before_saving_and_the_rerun_matches(tmp_path: Path, reference: tuple[Path, list], mode: str) -> None:
    overrides = [*COMMON, f"checkpoint.async_save={mode == 'async'}"]
    out = launch(tmp_path, *overrides, fault={"nan_step": 5})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (f"step 5: loss nan, gradient norm nan (rank 0) is not finite; stopped before the optimizer step "
            f"(train.on_nonfinite=stop), nothing saved after {tmp_path / 'checkpoints' / 'step_00000004'}") in out.stderr
    assert newest_verified_step(tmp_path / "checkpoints") == 4  # async: the save staged at step 4 is still published
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]
    if mode == "async":
        return
    again = launch(tmp_path, *COMMON)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_record(rows(tmp_path), reference[1])


def test_nan_step_skipped_is_logged_as_null(tmp_path: Path) -> None:
    out = launch(tmp_path, *COMMON, "train.on_nonfinite=skip", fault={"nan_step": 3})
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if "not finite" in line]
    assert warnings == ["moeforge: step 3: loss nan, gradient norm nan (rank 0) is not finite; update skipped (1 in a row, "
                        "at most train.max_consecutive_skips=10)"]
    by_step = {r["step"]: r for r in rows(tmp_path)}
    assert by_step[3]["loss"] is None and by_step[3]["grad_norm"] is None and by_step[3]["skipped_steps"] == 1
    assert all(isinstance(by_step[s]["loss"], float) for s in (1, 2, 4, 8)) and by_step[8]["skipped_steps"] == 1
    assert nonfinite_in_checkpoints(tmp_path / "checkpoints") == {"step_00000008": [], "step_00000007": []}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stop_signal_mid_step_finishes_saves_and_exits_128_plus_n(tmp_path: Path, reference: tuple[Path, list], sig: str) -> None:
    overrides = [*COMMON, "checkpoint.every=0"]  # only the stop signal (and the end) save
    out = launch(tmp_path, *overrides, fault={"signal_step": 5, "signal": sig})
    assert out.returncode == 128 + getattr(signal, sig)
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert (f"moeforge: {sig}: finished step 5 and saved {tmp_path / 'checkpoints' / 'step_00000005'}; exiting with "
            f"{128 + getattr(signal, sig)} (rerun the same command to resume)") in out.stderr.splitlines()
    assert newest_verified_step(tmp_path / "checkpoints") == 5
    if sig == "SIGTERM":
        again = launch(tmp_path, *overrides)
        assert again.returncode == 0, again.stderr[-3000:]
        assert_same_record(rows(tmp_path), reference[1])


def test_restart_keeps_a_true_record(tmp_path: Path) -> None:
    """Killed at step 5 after logging step 4 and checkpointing step 3: no duplicate step 4, the first
    window after the restart (steps 1-4) reports the uninterrupted loss, one W&B run, and the
    summary survives a rerun of the finished run."""
    overrides = [*SMALL, "train.steps=8", "train.log_every=4", "train.eval_every=4", "checkpoint.every=3", "router.jitter=0.1"]
    straight = tmp_path / "straight"
    assert launch(straight, *overrides).returncode == 0
    run = tmp_path / "run"
    killed = launch(run, *overrides, "logging=wandb_offline", fault={"kill_step": 5})
    assert killed.returncode == -signal.SIGKILL and [r["step"] for r in rows(run)] == [4]
    resumed = launch(run, *overrides, "logging=wandb_offline")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "metrics.jsonl: dropped 1 line(s) after step 3" in resumed.stderr
    assert_same_record(rows(run), rows(straight))
    wandb_id = (run / "wandb_id").read_text().strip()
    sessions = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.endswith(f"-{wandb_id}") for s in sessions)
    summary = (run / "summary.json").read_text()
    assert launch(run, *overrides, "logging=wandb_offline").returncode == 0
    assert (run / "summary.json").read_text() == summary


def test_second_writer_is_refused_and_the_first_stops_gracefully(tmp_path: Path) -> None:
    overrides = [f"hydra.run.dir={tmp_path}", *SMALL, "train.steps=100000", "train.log_every=20", "checkpoint.every=0"]
    env = {k: v for k, v in os.environ.items() if k != "MOEFORGE_RUN_ID"} | {"MOEFORGE_DEVICE": "cpu"}
    with running([sys.executable, "-m", "launch.train", *overrides], env, stderr=subprocess.PIPE) as first:
        wait_for_metrics(tmp_path, first)
        second = launch(tmp_path, *SMALL, "train.steps=100000")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"moeforge: error: run directory {tmp_path} is in use by pid {first.pid} on host " in second.stderr
        assert first.poll() is None  # the first run is untouched
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-3000:]
    saved = newest_verified_step(tmp_path / "checkpoints")
    assert saved is not None and saved >= 20 and f"SIGTERM: finished step {saved} and saved" in err


def test_nan_step_between_log_steps_stops_one_step_later_and_saves_nothing_after_it(tmp_path: Path) -> None:
    """No log, evaluation or save at step 5: the step guard reads step 5's verdict at the end of step 6 (one step
    late, so the host never waits for the device mid-queue). Step 5 updated nothing; nothing after step 4 is saved."""
    out = launch(tmp_path, *SMALL, "train.steps=12", "train.log_every=100", "train.eval_every=100", "checkpoint.every=4",
                 fault={"nan_step": 5})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (f"step 5: loss nan, gradient norm nan (rank 0) is not finite; stopped before the optimizer step "
            f"(train.on_nonfinite=stop), nothing saved after {tmp_path / 'checkpoints' / 'step_00000004'}") in out.stderr
    assert newest_verified_step(tmp_path / "checkpoints") == 4
    assert nonfinite_in_checkpoints(tmp_path / "checkpoints") == {"step_00000004": []}
