"""Metrics that say what they are on 2 gloo ranks: auxiliary losses averaged over ranks, communication
bytes summed over ranks, and an FSSDP resume as bit-exact as the other layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel import ParallelConfig, setup_runtime
from parallel.fssdp import initial_owners
from tests.parallel.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _reductions_worker() -> None:
    rt = setup_runtime(ParallelConfig(mode="ddp", timeout_s=60))
    try:
        r = rt.rank
        got = rt.mean_over_ranks({"aux_loss": torch.tensor(1.0 + r, dtype=torch.float32), "z_loss": torch.tensor(0.25 * r)})
        assert got == {"aux_loss": 1.5, "z_loss": 0.125}, got
        rt.meter.add("a2a", 100.0 * (r + 1), 10.0)
        if r == 1:
            rt.meter.add("only_rank1", 7.0, 3.0)  # a key one rank never saw counts 0 there
        rt._steps = 2  # two optimizer steps since the last log: bytes are per step
        summed = rt.comm_metrics(over_ranks=True)
        assert summed == {"comm/a2a_bytes_sent": 150.0, "comm/a2a_bytes_recv": 10.0, "comm/only_rank1_bytes_sent": 3.5,
                          "comm/only_rank1_bytes_recv": 1.5, "comm/total_bytes_sent": 153.5, "comm/total_bytes_recv": 11.5}, summed
        rt.meter.add("a2a", 8.0 * (r + 1), 0.0)
        assert rt.comm_metrics()["comm/a2a_bytes_sent"] == 8.0 * (r + 1)  # the per-rank view stays available
    finally:
        rt.shutdown()


def test_aux_losses_are_averaged_and_bytes_summed_over_ranks() -> None:
    run_distributed(_reductions_worker, 2)


COMMON = ["model=tiny", "train.batch_size=4", "train.seq_len=32", "train.log_every=1", "train.eval_every=1000", "logging=none",
          "train.steps=12", "parallel=fssdp", "parallel.fssdp.reshard_every=4", "checkpoint.every=6"]


def _train(run_dir: Path, *overrides: str) -> dict[int, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MOEFORGE_DEVICE="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MOEFORGE_RUN_ID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "launch.train", *COMMON,
           f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row}


@pytest.mark.slow
def test_fssdp_resume_is_bit_exact_and_logged_metrics_are_over_ranks(tmp_path: Path) -> None:
    """Resharding every 4 steps moves experts before the step-6 checkpoint; the resumed run must
    plan (owners, holders, window) as the straight one and log the same numbers bit for bit."""
    straight = _train(tmp_path / "straight")
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000006", crashed / "checkpoints" / "step_00000006")
    owners = json.loads((crashed / "checkpoints" / "step_00000006" / "objects.json").read_text())["fssdp"]["owners"]
    assert any(o != initial_owners(len(o), 2) for o in owners), "no expert moved before the checkpoint: the test would not test it"
    resumed = _train(crashed)
    assert sorted(resumed) == list(range(7, 13))
    for step in range(7, 13):
        for key in ("loss", "grad_norm", "aux_loss", "comm/total_bytes_sent", "routing/layer0/tokens_per_expert"):
            assert resumed[step][key] == straight[step][key], (step, key)
    # the logged bytes are the job's: each of the 2 ranks sends the same all-to-all volume to the other
    assert straight[12]["comm/total_bytes_sent"] == straight[12]["comm/total_bytes_recv"] > 0
