"""What the fault-injection tests assert about a run directory: its metrics and its checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from launch.checkpoint import published_checkpoints, select_checkpoint, step_of
from launch.dcp_io import SafeFileSystemReader, TensorOnlyPlanner, read_metadata
from launch.throughput import TIMING_KEYS
from parallel import Runtime

WALL_CLOCK = TIMING_KEYS


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without what legitimately differs between runs: throughput and memory, and the
    routing flips that are absent at the first evaluation of every process."""
    return {k: v for k, v in row.items() if k not in WALL_CLOCK and not k.endswith("/flips")}


def assert_same_record(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """One row per step, in order, each equal to the uninterrupted run's (losses bit for bit)."""
    assert [r["step"] for r in got] == [r["step"] for r in want], "steps logged"
    for g, w in zip(got, want):
        assert comparable(g) == comparable(w), f"step {g['step']}"


def newest_verified_step(ckpt_dir: Path) -> int | None:
    path = select_checkpoint(ckpt_dir, Runtime())
    return None if path is None else step_of(path)


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, loaded from its own metadata (safely)."""
    meta = read_metadata(path)
    state = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyPlanner(), no_dist=True)
    return state


def nonfinite_in_checkpoints(ckpt_dir: Path) -> dict[str, list[str]]:
    """``{checkpoint name: [tensors holding NaN/Inf]}`` over every published checkpoint (empty lists: clean)."""
    return {p.name: [k for k, t in all_tensors(p).items() if t.is_floating_point() and not torch.isfinite(t).all()]
            for p in published_checkpoints(ckpt_dir)}
