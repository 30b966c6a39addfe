"""DCP checkpoints written atomically, found again by ``checkpoint.resume=auto``.

Layout of ``checkpoint.dir``::

    step_00000100/            a complete checkpoint (DCP shards + .metadata)
        moeforge.json         step, config of the model-shaping groups; written last, before the rename
        rng_rank{r}.pt        each rank's torch RNG states
    step_00000200.tmp-<id>/   one being written; never read, removed at the next save

A checkpoint is written under a temporary name and renamed by rank 0 after every rank has
finished (``Runtime.barrier``), so an interrupted save never replaces or corrupts the last good
one. ``latest_checkpoint`` only considers renamed directories holding ``moeforge.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from moe.errors import CheckpointError
from parallel import Runtime

_NAME = re.compile(r"^step_(\d{8})$")
MANIFEST = "moeforge.json"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    complete = [p for p in d.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return max(complete, key=lambda p: int(_NAME.match(p.name).group(1)), default=None)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], manifest: dict[str, Any], runtime: Runtime, keep: int) -> Path:
    """Write ``state`` (DCP) + RNG + manifest for ``step``; atomically publish it; prune old ones."""
    d = Path(directory)
    final = d / f"step_{step:08d}"
    token = [uuid.uuid4().hex[:8]]
    if runtime.world_size > 1:
        torch.distributed.broadcast_object_list(token, src=0)
    tmp = d / f"{final.name}.tmp-{token[0]}"
    if runtime.is_main:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    runtime.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        (tmp / MANIFEST).write_text(json.dumps({"step": step, **manifest}, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        complete = sorted((p for p in d.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file()), key=lambda p: p.name)
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}: {err}") from None


def check_compatible(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model-shaping config differs from this run's, naming the key."""
    saved = read_manifest(path)
    for group, values in manifest.items():
        if group == "step" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(group, {}).get(key, value)
            if old != value:
                raise CheckpointError(
                    f"checkpoint {path} was written with {group}.{key}={old!r} but this run has {group}.{key}={value!r}; "
                    f"use the same value, another checkpoint.dir, or checkpoint.resume=never"
                )


def load_checkpoint(path: Path, state: dict[str, Any], runtime: Runtime) -> None:
    """Load ``path`` into ``state`` in place (DCP) and restore this rank's RNG state."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"checkpoint {path} does not match this model/optimizer: {err}") from err
    rng_file = path / f"rng_rank{runtime.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
