"""Faults under torchrun (2 gloo ranks on CPU): bad layout, SIGTERM to the agent, a killed agent, a killed rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.checks import assert_same_record, newest_verified_step, rows
from tests.faults.procs import run, running, wait_for_metrics
from tests.launch.test_train import REPO, SMALL

pytestmark = pytest.mark.slow

TWO_RANKS = [*SMALL, "parallel=ddp", "train.log_every=1"]


def _env(fault: dict | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MOEFORGE_FAULT=json.dumps(fault or {}), MOEFORGE_DEVICE="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MOEFORGE_RUN_ID", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def torchrun(run_dir: Path, *overrides: str, launcher: str = "launch.torchrun", module: str = "launch.train", extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", launcher, "--standalone", "--nproc-per-node", "2", *extra, "-m", module,
            f"hydra.run.dir={run_dir}", *overrides]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_bad_layout_prints_one_message_and_no_launcher_traceback(tmp_path: Path) -> None:
    out = run(torchrun(tmp_path, *TWO_RANKS, "parallel=ep", "parallel.ep_size=3"), _env())
    assert out.returncode == 2
    message = "moeforge: error: parallel.ep_size (3) must be <= the world size (2)"
    assert out.stderr.count(message) == 1, out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("moeforge: torchrun: rank ")
    for rank in (0, 1):  # every rank's log holds it
        assert message in (tmp_path / f"train_rank{rank}.log").read_text()


def test_sigterm_to_the_agent_saves_and_exits_143(tmp_path: Path) -> None:
    with running(torchrun(tmp_path, *TWO_RANKS, "train.steps=100000", "checkpoint.every=0"), _env(), stderr=subprocess.PIPE) as proc:
        wait_for_metrics(tmp_path, proc, lines=3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    saved = newest_verified_step(tmp_path / "checkpoints")
    assert saved is not None and saved >= 3
    assert err.count(f"moeforge: SIGTERM: finished step {saved} and saved") == 1


def test_workers_of_a_killed_agent_stop_without_writing(tmp_path: Path) -> None:
    cmd = torchrun(tmp_path, *TWO_RANKS, "train.steps=100000", "checkpoint.every=5", launcher="torch.distributed.run")
    with running(cmd, _env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as agent:
        wait_for_metrics(tmp_path, agent, lines=6)
        workers = children(agent.pid)
        assert len(workers) == 2
        agent.kill()  # the agent alone: its workers are re-parented and must notice
        agent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "workers kept running after their agent was killed"
    log = (tmp_path / "train_rank0.log").read_text()
    assert f"the torchrun agent (pid {agent.pid}) is gone; stopping at step" in log
    newest = newest_verified_step(tmp_path / "checkpoints")
    assert newest is not None and newest % 5 == 0
    # The lock went with them: a rerun in one process resumes from their newest checkpoint.
    rerun = run([sys.executable, "-m", "launch.train", f"hydra.run.dir={tmp_path}", *SMALL, f"train.steps={newest + 2}"], _env())
    assert rerun.returncode == 0 and f"at step {newest}" in rerun.stderr, rerun.stderr[-3000:]


def test_max_restarts_recovers_a_killed_rank_with_the_same_losses(tmp_path: Path) -> None:
    overrides = [*TWO_RANKS, "train.steps=8", "train.eval_every=4", "checkpoint.every=2", "router.jitter=0.1"]
    straight = tmp_path / "straight"
    ref = run(torchrun(straight, *overrides), _env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "run"
    out = run(torchrun(run_dir, *overrides, module="tests.faults.inject", extra=("--max-restarts", "1")), _env({"kill_step": 5, "rank": 1}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in (run_dir / "train_rank1.log").read_text()
    assert_same_record(rows(run_dir), rows(straight))


FOUR_RANKS = [*TWO_RANKS, "train.steps=200", "checkpoint.every=0"]


def torchrun4(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node", "4", "-m", "tests.faults.inject",
            f"hydra.run.dir={run_dir}", *overrides]


def _stamp(line: str) -> float:
    """Seconds of a ``[YYYY-mm-dd HH:MM:SS,mmm][LEVEL]`` log line."""
    from datetime import datetime

    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _failure_lines(err: str, run_dir: Path, failed: int) -> None:
    """Each survivor: exactly one line on stderr and in its log naming ``failed``; no traceback; the
    launcher's last line names ``failed`` too."""
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    for rank in {0, 1, 2, 3} - {failed}:
        mine = [ln for ln in err.splitlines() if ln.startswith(f"moeforge: rank {rank} stopping")]
        assert len(mine) == 1 and f"rank {failed} failed first" in mine[0], err[-3000:]
        log_lines = [ln for ln in (run_dir / f"train_rank{rank}.log").read_text().splitlines() if "stopping" in ln]
        assert len(log_lines) == 1 and f"rank {failed} failed first" in log_lines[0]
    assert err.strip().splitlines()[-1].startswith(f"moeforge: torchrun: rank {failed} failed first"), err[-3000:]


def test_four_ranks_a_killed_rank_is_named_once_by_each_survivor(tmp_path: Path) -> None:
    out = run(torchrun4(tmp_path, *FOUR_RANKS), _env({"kill_step": 3, "rank": 2}))
    assert out.returncode == 137, out.stderr[-3000:]  # the killed rank's status
    _failure_lines(out.stderr, tmp_path, failed=2)
    assert "its process" in out.stderr and "is gone" in out.stderr


def test_four_ranks_a_frozen_rank_is_named_within_heartbeat_plus_one_step(tmp_path: Path) -> None:
    heartbeat_s = 4.0
    t0 = time.monotonic()
    out = run(torchrun4(tmp_path, *FOUR_RANKS, f"parallel.heartbeat_s={heartbeat_s}"), _env({"stop_step": 4, "rank": 1}))
    assert time.monotonic() - t0 < 120  # not the 600 s process-group timeout
    assert out.returncode == 137, out.stderr[-3000:]  # the frozen rank, ended by the peer that named it
    _failure_lines(out.stderr, tmp_path, failed=1)
    assert f"no heartbeat for {heartbeat_s:.0f}" in out.stderr
    log = (tmp_path / "train_rank0.log").read_text().splitlines()
    steps = [_stamp(ln) for ln in log if "] [" in ln and " step " in ln]  # progress lines of steps 1-3
    stopped = _stamp(next(ln for ln in log if "stopping" in ln))
    step_s = steps[-1] - steps[-2]
    # Rank 1 froze at the start of step 4, right after step 3's line; polling adds at most 3/20 of heartbeat_s.
    assert stopped - steps[-1] <= heartbeat_s + step_s + 0.15 * heartbeat_s + 0.5, (stopped - steps[-1], step_s)
