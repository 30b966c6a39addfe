"""``engine=deepspeed parallel=ep`` against native ``parallel=ep`` on 2 and 4 gloo ranks, resume included.

Each config (ranks x ZeRO stage) trains ``launch.train.train`` for 10 steps of a small model with
``parallel.ep_size=2`` (2 ranks: one expert-parallel group, no expert replicas; 4 ranks: two
expert-parallel groups [0, 1], [2, 3] whose experts are replicated over the expert-data-parallel
groups [0, 2], [1, 3], which ZeRO partitions them over). The per-step loss, gradient norm and
learning rate and the final weights (every expert, from the ``experts_ep<k>.pt`` files) must be
within 1e-4 of native ``parallel=ep``; a run resumed from its step-5 checkpoint must continue
bit-for-bit as the run that was not interrupted. They skip only when deepspeed is not importable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.engines.deepspeed_moe import experts_file, full_expert_weights
from tests.launch.test_engine_deepspeed import (
    SMALL,
    STEPS,
    TOL,
    deepspeed_weights,
    job_of,
    max_diff,
    native_weights,
    needs_deepspeed,
    per_step,
)
from tests.parallel import dist_harness
from tests.parallel.dist_harness import run_distributed

EP = ["parallel=ep", "parallel.ep_size=2", "checkpoint.every=5"]


def dist_harness_target(run_dir: str, overrides: list[str]) -> None:
    """One rank: compose the job and train (the harness set the torchrun variables)."""
    from launch.train import train  # noqa: PLC0415  (imported in the rank process)

    job = job_of(*overrides)
    job.checkpoint.dir = str(Path(run_dir) / "ckpt")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    train(job, Path(run_dir))


def run(run_dir: Path, ranks: int, *overrides: str) -> list[dict[str, Any]]:
    """``launch.train.train`` on ``ranks`` fresh gloo ranks (DeepSpeed keeps its groups in module globals)."""
    dist_harness._close_all()
    run_distributed(dist_harness_target, ranks, str(run_dir), [*SMALL, *EP, *overrides], timeout_s=300)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ds_ep_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every weight of a DeepSpeed ep checkpoint: the dense ones from DeepSpeed's module file, the experts from moeforge's files."""
    weights = deepspeed_weights(ckpt)
    experts = full_expert_weights(ckpt)
    assert experts and set(experts) <= set(weights), sorted(experts)
    return {**weights, **experts}


@pytest.fixture(scope="module")
def native_ep(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """Native ``parallel=ep`` rows and final weights, per number of ranks (computed on first use)."""
    cache: dict[int, tuple[list[dict[str, Any]], dict[str, torch.Tensor]]] = {}

    class Lazy(dict):
        def __missing__(self, ranks: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
            d = tmp_path_factory.mktemp(f"native_ep{ranks}")
            rows = run(d, ranks)
            self[ranks] = (rows, native_weights(d / "ckpt" / f"step_{STEPS:08d}", job_of(*SMALL)))
            return self[ranks]

    return Lazy(cache)


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "stage"), [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_matches_native_ep_and_resumes_exactly(ranks: int, stage: int, native_ep: Any, tmp_path: Path) -> None:
    want_rows, want_weights = native_ep[ranks]
    knobs = ["engine=deepspeed", f"engine.zero_stage={stage}"]
    rows = run(tmp_path / "straight", ranks, *knobs)
    for key in ("loss", "grad_norm", "lr"):
        got, want = per_step(rows, key), per_step(want_rows, key)
        assert sorted(got) == list(range(1, STEPS + 1))
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=TOL, abs=TOL), f"{key} at step {s}: {got[s]} vs {want[s]}"
        print(f"ranks={ranks} zero_stage={stage}: max |{key} - native ep| over {STEPS} steps = {max(abs(got[s] - want[s]) for s in got):.3g}")
    assert want_rows[-1]["loss"] < want_rows[0]["loss"] - 0.1  # it trained: equality of two frozen runs would prove nothing
    final = tmp_path / "straight" / "ckpt" / f"step_{STEPS:08d}"
    manifest = json.loads((final / "moeforge.json").read_text())
    assert manifest["engine"] == {"name": "deepspeed", "zero_stage": stage}
    assert manifest["parallel"] == {"mode": "ep", "ep_size": 2}
    assert sorted(p.name for p in final.glob("experts_ep*.pt")) == [experts_file(0), experts_file(1)]
    weights = ds_ep_weights(final)
    diff = max_diff(weights, want_weights)
    print(f"ranks={ranks} zero_stage={stage}: max |weight - native ep| = {diff:.3g}")
    assert diff < TOL

    crashed = tmp_path / "crashed"
    (crashed / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "ckpt" / "step_00000005", crashed / "ckpt" / "step_00000005")
    resumed = run(crashed, ranks, *knobs)
    assert min(per_step(resumed, "loss")) == 6  # it resumed after step 5 instead of starting over
    for key in ("loss", "grad_norm", "lr"):
        want = per_step(rows, key)
        for s, value in per_step(resumed, key).items():
            assert value == want[s], f"{key} at step {s}: {value} vs {want[s]}"
    assert max_diff(ds_ep_weights(crashed / "ckpt" / f"step_{STEPS:08d}"), weights) == 0.0
