"""launch/slurm.sbatch requeues a job whose ranks saved and stopped on a signal, or (a bounded
number of times) whose rank died or froze, and only then.

SLURM is not installed here: ``srun`` and ``scontrol`` are stubs on PATH that record their
arguments; the stub ``srun`` exits with the status the ranks would have had.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.launch.test_train import REPO

STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $* MOEFORGE_RUN_ID=${MOEFORGE_RUN_ID:-}" >> "$CALLS"
if [[ "$(basename "$0")" == srun ]]; then exit "$SRUN_STATUS"; fi
if [[ "$1" == show ]]; then echo node0; echo node1; fi
"""


@pytest.mark.parametrize("status,restarts,requeued", [(0, 0, False), (2, 0, False), (138, 0, True), (143, 5, True),
                                                      (3, 0, True), (137, 1, True), (137, 2, False), (3, 2, False)])
def test_sbatch_requeues_after_a_signal_save(tmp_path: Path, status: int, restarts: int, requeued: bool) -> None:
    """Signal saves always requeue; rank failures (3: a peer failed, 137: killed or frozen) at most
    MOEFORGE_FAILURE_REQUEUES (2) times, counted by SLURM_RESTART_COUNT."""
    for name in ("srun", "scontrol"):
        (tmp_path / name).write_text(STUB)
        (tmp_path / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(calls), "SRUN_STATUS": str(status),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_RESTART_COUNT": str(restarts)}
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "parallel=ep"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == status
    lines = calls.read_text().splitlines()
    srun = next(line for line in lines if line.startswith("srun "))
    assert "-m launch.torchrun" in srun and "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in srun
    assert "--rdzv-endpoint node0:29500" in srun and srun.endswith("-m launch.train parallel=ep MOEFORGE_RUN_ID=moeforge-4242")
    assert any(line.startswith("scontrol requeue 4242") for line in lines) is requeued
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@300" in script.splitlines() and "#SBATCH --requeue" in script.splitlines()
