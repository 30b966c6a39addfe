"""``engine=deepspeed parallel=ep`` against native ``parallel=ep`` on 2 and 4 gloo ranks, resume included.

Each config (ranks x ZeRO stage) trains ``launch.train.train`` for 6 steps of a small model with
``parallel.ep_size=2`` (2 ranks: one expert-parallel group, no expert replicas; 4 ranks: two
expert-parallel groups [0, 1], [2, 3] whose experts are replicated over the expert-data-parallel
groups [0, 2], [1, 3], which ZeRO partitions them over). The per-step loss, gradient norm and
learning rate and the final weights (every expert, from the ``experts_ep<k>.pt`` files) must be
within 1e-4 of native ``parallel=ep``. A run resumed from its step-3 checkpoint must continue
bit-for-bit as the run that was not interrupted (ZeRO 1 on 2 ranks, ZeRO 2 on 4 ranks: each
stage and each rank count once, to keep CI short). They skip only when deepspeed is not importable.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.engines.deepspeed_moe import experts_file, full_expert_weights, mark_expert_params, moe_param_groups
from moe.experts import EXPERT_WEIGHT_NAMES
from tests.launch.test_engine_deepspeed import (
    SMALL,
    TOL,
    assert_steps_match,
    deepspeed_weights,
    job_of,
    max_diff,
    native_weights,
    needs_deepspeed,
    per_step,
)
from tests.parallel import dist_harness
from tests.parallel.dist_harness import run_distributed

STEPS = 6
KNOBS = [o for o in SMALL if not o.startswith(("train.steps=", "train.eval_every="))]
KNOBS += [f"train.steps={STEPS}", f"train.eval_every={STEPS}", "checkpoint.every=3", "parallel=ep", "parallel.ep_size=2"]


@needs_deepspeed
def test_experts_marked_and_regrouped_the_deepspeed_way_keeping_weight_decay() -> None:
    """Marks 2 and 3 on a real model: DeepSpeed's own ``is_moe_param`` and optimizer split see exactly the experts.

    A resume that changes ``optim.weight_decay`` must set it on the expert groups too (they decay:
    they are matrices), not only on the first group.
    """
    from deepspeed.moe.utils import is_moe_param, is_moe_param_group  # noqa: PLC0415

    from launch.optim import apply_config, build_optimizer  # noqa: PLC0415
    from moe.layer import MoELayer  # noqa: PLC0415
    from moe.model import MoETransformer  # noqa: PLC0415

    job = job_of(*KNOBS)
    model = MoETransformer(job.model, job.router, job.experts)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    mark_expert_params(layers, "ep_size_2")
    experts = {id(getattr(layer.experts, w)) for layer in layers for w in EXPERT_WEIGHT_NAMES}
    assert len(experts) == 3 * job.model.num_layers
    assert {id(p) for p in model.parameters() if is_moe_param(p)} == experts
    optimizer, scheduler = build_optimizer(model, job, regroup=moe_param_groups)
    moe = [g for g in optimizer.param_groups if is_moe_param_group(g)]
    assert [(g["name"], g["weight_decay"], g["decay"]) for g in moe] == [("ep_size_2", job.optim.weight_decay, True)]
    assert {id(p) for p in moe[0]["params"]} == experts
    assert not any(id(p) in experts for g in optimizer.param_groups if g not in moe for p in g["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    job.optim.weight_decay = 0.25
    assert apply_config(optimizer, scheduler, job)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.25, 0.0, 0.25]


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
    run_distributed(dist_harness_target, ranks, str(run_dir), [*KNOBS, *overrides], timeout_s=600)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ds_ep_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every weight of a DeepSpeed ep checkpoint: the dense ones from DeepSpeed's module file, the experts from moeforge's files."""
    weights = deepspeed_weights(ckpt)
    experts = full_expert_weights(ckpt)
    assert experts and set(experts) <= set(weights), sorted(experts)
    return {**weights, **experts}


@pytest.fixture(scope="module")
def native_ep(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """Native ``parallel=ep`` metrics rows and final weights for a number of ranks (each run once per module)."""
    done: dict[int, tuple[list[dict[str, Any]], dict[str, torch.Tensor]]] = {}

    def of(ranks: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        if ranks not in done:
            d = tmp_path_factory.mktemp(f"native_ep{ranks}")
            done[ranks] = (run(d, ranks), native_weights(d / "ckpt" / f"step_{STEPS:08d}", job_of(*KNOBS)))
        return done[ranks]

    return of


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "stage", "resume"), [(2, 1, True), (2, 2, False), (4, 1, False), (4, 2, True)])
def test_matches_native_ep_and_resumes_exactly(ranks: int, stage: int, resume: bool, native_ep: Callable[[int], Any], tmp_path: Path) -> None:
    """Equality with native ep in every config; the resume in one config per stage and per rank count (CI time)."""
    want_rows, want_weights = native_ep(ranks)
    knobs = ["engine=deepspeed", f"engine.zero_stage={stage}"]
    rows = run(tmp_path / "straight", ranks, *knobs)
    assert_steps_match(rows, want_rows, STEPS, f"ranks={ranks} zero_stage={stage}", "native ep")
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

    if not resume:
        return
    crashed = tmp_path / "crashed"  # a copy of the step-3 checkpoint, as a run killed after it would leave
    (crashed / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "ckpt" / "step_00000003", crashed / "ckpt" / "step_00000003")
    resumed = run(crashed, ranks, *knobs)
    assert min(per_step(resumed, "loss")) == 4  # it resumed after step 3 instead of starting over
    for key in ("loss", "grad_norm", "lr"):
        want = per_step(rows, key)
        for s, value in per_step(resumed, key).items():
            assert value == want[s], f"{key} at step {s}: {value} vs {want[s]}"
    assert max_diff(ds_ep_weights(crashed / "ckpt" / f"step_{STEPS:08d}"), weights) == 0.0
