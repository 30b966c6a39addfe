"""Every registered router trains the default model from the command line, and the checkpointable
routing events (EvoMoE's spawn, local search's freeze) resume exactly."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from moe.routers import ROUTERS
from tests.launch.test_train import launch, read_metrics

# The default model (model=tiny) with a smaller batch so 30 steps stay cheap on 2 cores.
QUICK = ["train.batch_size=4", "train.seq_len=64", "logging=none", "train.threads=1", "data.max_bytes=400000",
         "train.log_every=1", "train.eval_every=30", "optim.warmup_steps=5"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_trains_default_model_30_steps(tmp_path: Path, name: str) -> None:
    out = launch(tmp_path, f"router={name}", "train.steps=30", *QUICK)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (name, first, last)


def resume_matches_straight(tmp_path: Path, overrides: list[str], resume_from: int, steps: int) -> list[dict]:
    common = [*QUICK, "model.num_layers=2", f"train.steps={steps}", f"checkpoint.every={resume_from}",
              f"checkpoint.keep={steps}", *overrides]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    out = launch(straight, *common)
    assert out.returncode == 0, out.stderr[-3000:]
    name = f"step_{resume_from:08d}"
    shutil.copytree(straight / "checkpoints" / name, crashed / "checkpoints" / name)
    out = launch(crashed, *common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {crashed / 'checkpoints' / name}" in out.stderr
    a = {m["step"]: m for m in read_metrics(straight)}
    b = {m["step"]: m for m in read_metrics(crashed)}
    assert sorted(b) == list(range(resume_from + 1, steps + 1))
    for step in b:
        assert b[step]["loss"] == a[step]["loss"], step
    return [a[s] for s in sorted(a)]


@pytest.mark.slow
@pytest.mark.parametrize("resume_from", [2, 6])
def test_evomoe_spawn_resumes_exactly(tmp_path: Path, resume_from: int) -> None:
    # Spawn after step index 3 (base_steps=4): resuming from step 2 crosses it, from 6 must not redo it.
    metrics = resume_matches_straight(
        tmp_path, ["router=dts", "router.evolve.enabled=true", "router.evolve.base_steps=4", "router.decay_steps=4",
                   "router.hard_step=8", "router.tau_max=2.0", "router.tau_min=0.5"], resume_from, steps=10)
    loads = [m["routing/layer0/tokens_per_expert"] for m in metrics]
    assert all(sum(1 for c in load if c > 0) == 1 for load in loads[:4])  # base phase: one expert
    assert sum(1 for c in loads[5] if c > 0) > 1  # experts spawned and used



@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "comet"])
def test_local_search_freeze_resumes_exactly(tmp_path: Path, router: str) -> None:
    # Freeze after step index 3 (window_steps=4); resuming from step 2 crosses it.
    resume_matches_straight(
        tmp_path, [f"router={router}", "router.local_search.enabled=true", "router.local_search.window_steps=4"],
        resume_from=2, steps=8)


@pytest.mark.slow
def test_hash_frequency_table_balances_bytes(tmp_path: Path) -> None:
    """router.balance=frequency builds the hash table from the training bytes' counts: the load
    spread (max/min tokens per expert) is below the random table's on the same batches. (How far
    below depends on the corpus, here the running Python's stdlib, so only the order is asserted;
    tests/moe/routers/test_hash.py checks the table against the greedy assignment exactly.)"""
    spread = {}
    for balance in ("random", "frequency"):
        out = launch(tmp_path / balance, "router=hash", f"router.balance={balance}", "router.table_size=256", "train.steps=3", *QUICK)
        assert out.returncode == 0, out.stderr[-3000:]
        rows = [m for m in read_metrics(tmp_path / balance) if "routing/layer0/max_min_load" in m]
        spread[balance] = rows[-1]["routing/layer0/max_min_load"]
    assert spread["frequency"] < spread["random"], spread
