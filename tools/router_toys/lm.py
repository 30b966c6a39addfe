"""LM mode: the foundation's default byte-level model, one ``python -m launch.train`` run per arm and seed.

Each router arm runs ``python -m launch.train model=tiny router=<name> router.<field>=<value> ...
train.steps=N train.log_every=1 logging=none hydra.run.dir=<dir>`` and its ``metrics.jsonl`` is
read back: the training loss of every step, ``val_loss`` at the evaluations (final loss = the last
one), ``routing/layer{i}/flips`` (mean over layers), ``experts_per_token_mean`` and
``tokens_per_expert`` (summed over layers, binned per evaluation window for the heatmap). The
router fields (``--k``, the step-scaled schedules) come from the same rules as the toy tasks
(``tools.router_toys.specs``).

Dense baseline with equal active parameters: ``router=topk router.k=1 model.num_experts=1
model.d_ff=<k*F>``. A token in the MoE model runs k SwiGLU experts of width F, i.e. ``3·D·k·F``
expert weights and FLOPs; one expert of width ``k·F`` has exactly the same count. With one expert
the top-1 weight is the softmax of a single logit, exactly 1, so the layer *is* a dense SwiGLU FFN of
width ``k·F`` (the router keeps a D-vector that gets no gradient; its aux and z losses are switched
off so nothing but the language-model loss trains the model). This is the FLOP-matched dense
comparison of Switch Transformer (Fedus et al. 2021, §2.3/Table 1) and GShard: the MoE's extra
(inactive) experts are what is being evaluated.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.router_toys.specs import RouterSpec, resolve_values
from tools.router_toys.train_toy import RunResult, late_flip_rate, steps_to_target

REPO_ROOT = Path(__file__).resolve().parents[2]
DENSE_LABEL = "dense (k·F)"
DENSE_KEYS = ("model.d_ff", "model.num_experts", "router.k")
"""Keys the dense arm sets itself (a user override of them is not passed to that arm)."""


@dataclass(frozen=True)
class LmArm:
    label: str
    overrides: tuple[str, ...]
    """Hydra overrides that select this arm (router and, for the baseline, model)."""


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra command-line value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def router_arm(spec: RouterSpec, k: int | None, steps: int) -> LmArm:
    """The arm of one router spec: ``router=<name>`` plus its resolved field values."""
    values = resolve_values(spec, k, steps)
    return LmArm(spec.label, (f"router={spec.name}", *(f"router.{p}={hydra_value(v)}" for p, v in values.items())))


def dense_arm(k: int, d_ff: int) -> LmArm:
    """The dense baseline with the active parameters of top-``k`` of experts of width ``d_ff`` (module docstring)."""
    return LmArm(
        DENSE_LABEL,
        ("router=topk", "router.k=1", "router.aux_loss_coef=0", "router.z_loss_coef=0", "model.num_experts=1", f"model.d_ff={k * d_ff}"),
    )


def override_value(overrides: list[str], key: str) -> str | None:
    """The last value ``overrides`` give ``key`` (Hydra's last value wins), or None."""
    values = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == key]
    return values[-1] if values else None


def overrides_for(arm: LmArm, extra: list[str]) -> list[str]:
    """``extra`` for ``arm``: the dense arm drops the keys it sets itself (else the user's value would win)."""
    if arm.label != DENSE_LABEL:
        return list(extra)
    return [o for o in extra if o.partition("=")[0].strip() not in DENSE_KEYS]


EVALS = 8
"""Evaluations per run (the validation-loss curve has this many points)."""
EVAL_BATCHES = 16
"""Validation batches per evaluation: fixed within a run and the same for every arm with the same
seed (``sampler.batch(index)`` of the validation split depends on ``train.seed``), so arms are
compared paired by seed (``report.paired_difference``); different seeds see different windows."""


def train_command(
    arm: LmArm, seed: int, steps: int, run_dir: Path, ckpt_dir: Path, extra: list[str], backend: str = "torch", threads: int = 1,
    nproc: int = 1,
) -> list[str]:
    """The ``python -m launch.train`` command line of one arm and seed (``extra`` overrides go last);
    with ``nproc`` > 1 the run is ``nproc`` data-parallel ranks (``launch.torchrun --standalone``,
    ``parallel=ddp``) sharing the same global batch."""
    launcher = ["-m", "launch.torchrun", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    layout = ["parallel=ddp"] if nproc > 1 else []
    return [
        sys.executable, *launcher, "-m", "launch.train", "model=tiny", *layout, *arm.overrides,
        f"experts.backend={backend}", f"train.steps={steps}", "train.log_every=1", f"train.threads={threads}",
        f"train.eval_every={max(1, steps // EVALS)}", f"train.eval_batches={EVAL_BATCHES}", f"train.seed={seed}",
        "logging=none", f"checkpoint.dir={ckpt_dir}", "checkpoint.every=0", "checkpoint.resume=never",
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def _layer_mean(line: dict[str, Any], stat: str) -> float | None:
    vals = [v for k, v in line.items() if k.startswith("routing/layer") and k.endswith(f"/{stat}")]
    return float(np.mean(vals)) if vals else None


def _layer_sum_counts(line: dict[str, Any]) -> np.ndarray | None:
    lists = [np.asarray(v, dtype=np.float64) for k, v in line.items() if k.startswith("routing/layer") and k.endswith("/tokens_per_expert")]
    return np.sum(lists, axis=0) if lists else None


def read_metrics(path: Path, label: str, seed: int, steps: int, target: float, window: int = 10) -> RunResult:
    """A ``RunResult`` from one run's ``metrics.jsonl`` (NMI stays NaN: the LM has no true clusters)."""
    lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    result = RunResult(label=label, seed=seed)
    ept: list[float] = []
    window_counts: np.ndarray | None = None
    for line in lines:
        if "loss" in line:
            result.losses.append(float(line["loss"]))
        e = _layer_mean(line, "experts_per_token_mean")
        if e is not None:
            ept.append(e)
        counts = _layer_sum_counts(line)
        if counts is not None:
            window_counts = counts if window_counts is None else window_counts + counts
        if "val_loss" in line:
            result.eval_steps.append(int(line["step"]))
            result.eval_losses.append(float(line["val_loss"]))
            flips = _layer_mean(line, "flips")
            if flips is not None:
                result.flips.append(flips)
            if window_counts is not None:
                result.load_fractions.append((window_counts / max(window_counts.sum(), 1.0)).tolist())
                window_counts = None
    if result.eval_losses:
        result.final_loss = result.eval_losses[-1]
    result.flip_rate = late_flip_rate(result.eval_steps[-len(result.flips) - 1 :], result.flips, steps) if result.flips else math.nan
    result.steps_to_target = steps_to_target(result.losses, target, min(window, max(1, len(result.losses))))
    result.experts_per_token_train = float(np.mean(ept)) if ept else math.nan
    result.experts_per_token_final = ept[-1] if ept else math.nan
    return result


def run_arm(
    arm: LmArm, seed: int, steps: int, target: float, runs_dir: Path, extra: list[str],
    backend: str = "torch", timeout_s: float | None = None, threads: int = 1, nproc: int = 1,
) -> RunResult:
    """Run one arm and seed; keeps ``metrics.jsonl`` under ``runs_dir``, deletes the checkpoint."""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in arm.label)
    run_dir = runs_dir / f"{slug}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    ckpt_dir = Path(tempfile.mkdtemp(prefix="moeforge_cmp_ckpt_"))
    cmd = train_command(arm, seed, steps, run_dir, ckpt_dir, extra, backend, threads, nproc)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"launch.train exited {proc.returncode}: {' '.join(tail)}")
    result = read_metrics(run_dir / "metrics.jsonl", arm.label, seed, steps, target)
    result.wall_s = time.perf_counter() - t0
    return result
