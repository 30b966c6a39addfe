"""DCP checkpoints: never saved non-finite, verified before loading, published atomically, pruned safely.

Layout of ``checkpoint.dir``::

    moeforge.lock             the lock of the run writing here (launch/run_lock.py)
    step_00000100/            a published checkpoint
        .metadata             DCP metadata, read with a restricted unpickler (launch/dcp_io.py)
        __0_0.distcp ...      DCP shards: tensors only
        objects.json          every non-tensor value: LR scheduler, optimizer param groups, trainer counters
        rng_rank{r}.pt        rank r's RNG state (tensors; read with torch.load(weights_only=True))
        config.yaml           the composed config of the run that wrote it (every group, resolved), so
                              a checkpoint describes itself (launch/pretrained.py, tools/export_hf.py)
        moeforge.json         the manifest, written last: format, step, world size, the config of the
                              model-shaping groups, and the size and SHA-256 of every file above
    step_00000200.tmp-<id>/   being written: never read, removed by the next save
    step_00000050.del-<id>/   being pruned: never read, removed by the next save

Saving (``CheckpointWriter``, every rank): refuse a state holding NaN/Inf (all ranks agree, the
offending tensor is named), write into ``.tmp-<id>``, hash the files (each rank a share), then rank
0 writes the manifest, fsyncs it, renames the directory to ``step_N`` (one atomic rename) and only
then prunes: older checkpoints beyond ``keep`` are renamed to ``.del-<id>`` before they are deleted,
so a kill at any point leaves every published checkpoint whole and never removes the newest one.
Before writing, the ranks agree on a free-space check against the newest checkpoint's size
(launch/disk_space.py: a warning when fewer than two fit, a stop before writing when one does not);
a write that fails anyway is told in one line (OS error, path, bytes needed and free), its partial
``.tmp-<id>`` folder is removed and the published checkpoints are untouched.
With ``checkpoint.async_save`` the shards are written by DCP's ``async_save`` in a background
thread while training goes on; the same hashing, manifest, rename and pruning happen when the
next save starts or the run ends, so an unfinished async save is never published.

Resuming (``select_checkpoint``): the newest published checkpoint whose files all verify. One that
does not (a file missing, truncated or changed, metadata that is not plain DCP metadata, a
manifest from before checksums) is named with its first problem in one line, and the next older
one is tried.
"""

from __future__ import annotations

from collections.abc import Callable

import json
import logging
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from launch.checksums import digests, problems, share
from launch.dcp_io import (
    METADATA,
    SafeFileSystemReader,
    TensorOnlyPlanner,
    merge_objects,
    objects_from_json,
    objects_to_json,
    read_metadata,
    split_state,
)
from launch.disk_space import check_space, describe_write_error
from moe.errors import CheckpointError
from parallel import Runtime
from parallel.dense import local_tensor

_NAME = re.compile(r"^step_(\d{8})$")
MANIFEST = "moeforge.json"
LOSS_WINDOW = "loss_window"
"""Manifest key of the trainer's loss window (launch/spike_guard.py), for any engine's checkpoints."""
OBJECTS = "objects.json"
CONFIG = "config.yaml"
FORMAT = 2
"""Manifest format: 2 = per-file SHA-256, tensors-only DCP, objects.json (1 = moeforge before checksums)."""

log = logging.getLogger("moeforge")


def step_of(path: Path) -> int:
    """The step number in a ``step_N`` directory name."""
    match = _NAME.match(path.name)
    assert match is not None, path
    return int(match.group(1))


def published_checkpoints(directory: str | Path) -> list[Path]:
    """Every renamed ``step_N`` directory holding a manifest, newest first (not yet verified)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of, reverse=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest published checkpoint in ``directory`` (not verified), or None."""
    found = published_checkpoints(directory)
    return found[0] if found else None


# ----------------------------------------------------------------------------------------- saving


@dataclass
class PendingWrite:
    step: int
    tmp: Path
    future: Any = None
    need: int = 0
    """Bytes this checkpoint was expected to take (for the error line of a failed write)."""
    loss_window: dict[str, Any] | None = None
    """The trainer's loss window (``launch.spike_guard``), recorded in the manifest: readable for any engine."""


class CheckpointWriter:
    """Writes one run's checkpoints into ``directory`` (every rank calls ``save`` and ``finish`` together)."""

    def __init__(self, directory: str | Path, runtime: Runtime, keep: int, manifest: dict[str, Any], async_save: bool = False) -> None:
        self.dir, self.runtime, self.keep, self.manifest = Path(directory), runtime, keep, manifest
        self.async_save = async_save
        self.run_config: dict[str, Any] | None = None
        """The run's composed config; when set, every checkpoint carries it as ``config.yaml``."""
        self._pending: PendingWrite | None = None
        # DCP's async_save needs a CPU (gloo) group, and its background thread must not share a
        # group with the training collectives of the main thread.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Checkpoint ``state`` as step ``step``. Sync: returns the published path. Async: returns None
        once the shards are staged; ``finish`` (called by the next ``save`` or at the end) publishes.

        Raises ``CheckpointError`` naming the tensor when any rank's state holds NaN/Inf; nothing is
        written then, and the newest checkpoint stays the newest.
        """
        self.finish()
        tensors, objects = split_state(state)
        self.refuse_nonfinite(step, tensors)
        need = self.check_space(step) or _tensor_bytes(tensors)
        tmp = self.fresh_tmp(step, need)

        def write_local() -> None:
            write_rng_state(tmp, self.runtime)
            if self.runtime.is_main:
                write_durably(tmp / OBJECTS, lambda f: f.write(objects_to_json(objects).encode()))

        self.run_agreed(write_local, step, tmp, need)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
            try:
                if self.async_save:
                    future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group, no_dist=not dist.is_initialized())
                    self._pending = PendingWrite(step, tmp, future, need, loss_window_of(state))
                    return None
                dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
                raise self.write_failed(err, step, tmp, need) from None
        return self.publish(PendingWrite(step, tmp, None, need, loss_window_of(state)))

    def check_space(self, step: int) -> int:
        """Before writing step ``step``: the rank-agreed free-space check (``launch.disk_space``); returns
        the bytes one checkpoint needs (the newest published one's size; 0 when there is none)."""
        return check_space(self.dir, latest_checkpoint(self.dir), step, self.runtime).need

    def write_failed(self, err: BaseException, step: int, tmp: Path, need: int) -> CheckpointError:
        """The one-line error for a failed write (OS error, path, bytes needed and free); the partial
        ``tmp`` folder is removed (it was never published), older checkpoints stay untouched."""
        line = describe_write_error(err, step, tmp, need)  # free space as the write found it
        if self.runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = latest_checkpoint(self.dir)
        kept = f"; the newest checkpoint stays {newest.name}" if newest is not None else "; no checkpoint was published yet"
        return CheckpointError(line + kept)

    def run_agreed(self, write: Callable[[], None], step: int, tmp: Path, need: int) -> None:
        """Run this rank's part of a write; if it fails on any rank, every rank raises (none is left
        waiting in a collective) and the failing rank names its OS error."""
        failure: BaseException | None = None
        try:
            write()
        except Exception as err:
            failure = err
        if self.runtime.world_size > 1:
            flag = torch.tensor([float(failure is not None)], device=self.runtime.device)
            self.runtime.all_reduce_max_([flag])
            if failure is None and flag.item() > 0:
                raise CheckpointError(f"could not write checkpoint step {step} into {tmp}: another rank failed (its line names the error)")
        if failure is not None:
            raise self.write_failed(failure, step, tmp, need) from None

    def publish(self, pending: PendingWrite) -> Path | None:
        """Publish ``pending`` now (its files are all in ``pending.tmp``): what ``finish`` does for a staged save."""
        self._pending = pending
        return self.finish()

    def finish(self) -> Path | None:
        """Publish the pending save (wait for an async write first); returns its path, or None if none."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.future is not None:
            future = getattr(pending.future, "upload_completion", pending.future)
            try:
                future.result()
            except (Exception, CheckpointException) as err:
                raise self.write_failed(err, pending.step, pending.tmp, pending.need) from None
        rt = self.runtime
        if self.run_config is not None:
            text = OmegaConf.to_yaml(OmegaConf.create(self.run_config))
            self.run_agreed(lambda: write_durably(pending.tmp / CONFIG, lambda f: f.write(text.encode())) if rt.is_main else None,
                         pending.step, pending.tmp, pending.need)
        rt.barrier()  # every rank's shards and RNG file are on disk
        names = broadcast_object(sorted(p.name for p in pending.tmp.iterdir()) if rt.is_main else None, rt)
        listed: dict[str, Any] = {}
        for part in gather_objects(digests(pending.tmp, share(names, rt.rank, rt.world_size)), rt):
            listed.update(part)
        final = self.dir / f"step_{pending.step:08d}"
        manifest = {"format": FORMAT, "step": pending.step, "world_size": rt.world_size, **self.manifest, "files": listed}
        if pending.loss_window is not None:
            manifest[LOSS_WINDOW] = pending.loss_window

        def publish() -> None:
            if rt.is_main:
                write_durably(pending.tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
                _publish(pending.tmp, final)

        self.run_agreed(publish, pending.step, pending.tmp, pending.need)
        if rt.is_main:
            self._prune(pending.step)
        rt.barrier()
        return final

    def refuse_nonfinite(self, step: int, tensors: dict[str, Any]) -> None:
        bad = nonfinite_tensors(tensors)
        flag = torch.tensor([float(len(bad))], device=self.runtime.device)
        self.runtime.all_reduce_max_([flag])
        if flag.item() == 0:
            return
        names = [name for part in gather_objects(bad, self.runtime) for name in part]
        newest = latest_checkpoint(self.dir)
        raise CheckpointError(
            f"refusing to save step {step}: {names[0]} holds NaN/Inf ({len(names)} tensor(s) in all); "
            f"the newest checkpoint stays {newest if newest is not None else '(none)'}"
        )

    def fresh_tmp(self, step: int, need: int = 0) -> Path:
        """A new empty ``step_N.tmp-<id>`` (same id on every rank); stale tmp/del folders are removed."""
        token = broadcast_object(uuid.uuid4().hex[:8], self.runtime)
        tmp = self.dir / f"step_{step:08d}.tmp-{token}"

        def make() -> None:
            if self.runtime.is_main:
                self.dir.mkdir(parents=True, exist_ok=True)
                for stale in [*self.dir.glob("*.tmp-*"), *self.dir.glob("*.del-*")]:
                    shutil.rmtree(stale, ignore_errors=True)  # this run holds the lock: nobody else writes them
                tmp.mkdir()

        self.run_agreed(make, step, tmp, need)
        self.runtime.barrier()
        return tmp

    def _prune(self, step: int) -> None:
        """Delete published checkpoints older than ``step`` beyond the newest ``keep``; never newer ones."""
        older = [p for p in published_checkpoints(self.dir) if step_of(p) < step]
        for old in older[max(self.keep - 1, 0):]:
            doomed = old.with_name(f"{old.name}.del-{uuid.uuid4().hex[:8]}")
            old.rename(doomed)  # no longer a checkpoint before any of its files goes
            shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], manifest: dict[str, Any], runtime: Runtime, keep: int,
                    run_config: dict[str, Any] | None = None) -> Path:
    """Write and publish one checkpoint synchronously (``CheckpointWriter`` for a single save)."""
    writer = CheckpointWriter(directory, runtime, keep, manifest)
    writer.run_config = run_config
    final = writer.save(step, state)
    assert final is not None
    return final


def nonfinite_tensors(tensors: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in ``tensors`` (nested dicts) holding NaN or Inf.

    One ``isfinite().all()`` per tensor, gathered with a single device-to-host copy per device.
    """
    names, flags = [], []
    for name, t in _flatten(tensors, prefix):
        local = local_tensor(t)
        if local.is_floating_point() or local.is_complex():
            names.append(name)
            flags.append(torch.isfinite(local).all())
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    bad = []
    for idx in by_device.values():
        ok = torch.stack([flags[i] for i in idx]).cpu().tolist()
        bad += [names[i] for i, good in zip(idx, ok) if not good]
    return sorted(bad)


def loss_window_of(state: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's loss window in a state to save (``state["trainer"]["spike"]``), if any."""
    trainer = state.get("trainer")
    return trainer.get("spike") if isinstance(trainer, dict) else None


def _tensor_bytes(tensors: dict[str, Any]) -> int:
    """Bytes of this rank's tensors in ``tensors``: what a first checkpoint needs at least (no earlier one to measure)."""
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for _, t in _flatten(tensors, ""))


def _flatten(tree: dict[str, Any], prefix: str) -> list[tuple[str, Tensor]]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, f"{name}.")
        elif isinstance(value, Tensor):
            out.append((name, value))
    return out


def _publish(tmp: Path, final: Path) -> None:
    """Atomically make ``tmp`` the checkpoint ``final`` (replacing one of the same step)."""
    replaced = final.with_name(f"{final.name}.del-{uuid.uuid4().hex[:8]}")
    if final.exists():  # the same step again, e.g. after falling back from a corrupt one
        final.rename(replaced)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def write_durably(path: Path, write: Any) -> None:
    """Create ``path``, fill it with ``write(file)``, and fsync it before returning."""
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def broadcast_object(obj: Any, runtime: Runtime) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if runtime.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if runtime.world_size == 1:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


# -------------------------------------------------------------------------------------- resuming


def _manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{MANIFEST} is not readable ({err})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{MANIFEST} is not a JSON object")
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``; ``CheckpointError`` naming the checkpoint if unreadable."""
    try:
        return _manifest(path)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def verify_checkpoint(path: Path, runtime: Runtime) -> list[str]:
    """Problems found with checkpoint ``path`` (empty when it verifies); the same list on every rank.

    The manifest must be format 2 and list ``.metadata`` and ``objects.json``; every listed file must
    have its size and SHA-256 (each rank hashes a share); the metadata must be plain DCP metadata
    describing tensors only (``dcp_io.read_metadata``).
    """
    found: list[str] = []
    try:
        manifest = _manifest(path)
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"it was written before checkpoints carried checksums (format {manifest.get('format', 1)}, this moeforge writes {FORMAT})")
        files = manifest.get("files")
        if not isinstance(files, dict) or METADATA not in files or OBJECTS not in files:
            raise CheckpointError(f"{MANIFEST} does not list {METADATA} and {OBJECTS}")
        found += problems(path, files, share(list(files), runtime.rank, runtime.world_size))
        if not found and runtime.is_main:
            read_metadata(path)
    except CheckpointError as err:
        found.append(str(err))
    merged = sorted({p for part in gather_objects(found, runtime) for p in part})
    return merged


def select_checkpoint(directory: str | Path, runtime: Runtime,
                      verify: Callable[[Path, Runtime], list[str]] | None = None, kind: str = "") -> Path | None:
    """The newest published checkpoint in ``directory`` that verifies, or None when there is none.

    ``verify`` lists a checkpoint's problems (default ``verify_checkpoint``, the DCP layout; an
    engine with its own files passes its own). Each newer one that fails is named in one warning
    line with its first problem. If checkpoints exist but none verifies, raises ``CheckpointError``
    naming the newest one's first problem, rather than silently starting over.
    """
    verify = verify or verify_checkpoint
    candidates = broadcast_object(published_checkpoints(directory) if runtime.is_main else None, runtime)
    newest = ""
    for path in candidates:
        found = verify(path, runtime)
        if not found:
            return path
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        newest = newest or f"{path}: {found[0]}"
        log.warning(f"moeforge: checkpoint {path} failed verification: {found[0]}{more}; trying the next older one")
    if candidates:
        raise CheckpointError(
            f"no checkpoint in {directory} verifies{kind} ({len(candidates)} tried; the newest, {newest}); move them away "
            f"to start over, or set checkpoint.resume=never"
        )
    return None


SINCE = {("optim", "moments_dtype"): "fp32"}
"""Manifest keys added after checkpoints existed, and the value every checkpoint written before them has."""


def check_compatible(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model-shaping config differs from this run's, naming the key."""
    saved = read_manifest(path)
    for group, values in manifest.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(group, {}).get(key, SINCE.get((group, key), value))
            if old != value:
                raise CheckpointError(
                    f"checkpoint {path} was written with {group}.{key}={old!r} but this run has {group}.{key}={value!r}; "
                    f"use the same value, another checkpoint.dir, or checkpoint.resume=never"
                )


def load_checkpoint(path: Path, state: dict[str, Any], runtime: Runtime) -> None:
    """Load checkpoint ``path`` into ``state`` in place: tensors by DCP, the rest from JSON, then RNG.

    Nothing is unpickled except through allowlists (``dcp_io``; ``torch.load(weights_only=True)``).
    """
    tensors, _ = split_state(state)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyPlanner(), no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"checkpoint {path} does not match this model/optimizer: {err}") from err
    objects_file = path / OBJECTS
    try:
        text = objects_file.read_text()
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read {OBJECTS}: {err}") from None
    merge_objects(state, objects_from_json(text, objects_file))
    load_rng_state(path, runtime)


def rng_file(folder: Path, rank: int) -> Path:
    """Where rank ``rank``'s RNG state lies in checkpoint ``folder`` (every engine writes it there)."""
    return folder / f"rng_rank{rank}.pt"


def write_rng_state(folder: Path, runtime: Runtime) -> None:
    """Write this rank's RNG state (CPU, and every CUDA device's) into checkpoint ``folder``, fsynced."""
    write_durably(rng_file(folder, runtime.rank), lambda f: torch.save(rng_state(), f))


def load_rng_state(path: Path, runtime: Runtime) -> None:
    """Restore this rank's RNG state from checkpoint ``path`` (kept as seeded when it holds none for this rank).

    Read with ``torch.load(weights_only=True)``: a file holding anything but tensors and plain
    containers is refused (``CheckpointError`` naming what it references) without being loaded.
    """
    file = rng_file(path, runtime.rank)
    if file.is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols it was not written with
                set_rng_state(torch.load(file, weights_only=True))
        except Exception as err:  # weights_only refuses anything but tensors and plain containers
            named = re.search(r"GLOBAL ([\w.]+)", str(err))
            opcode = re.search(r"Unsupported operand \d+", str(err))
            what = f"it references {named.group(1)}" if named else opcode.group(0) if opcode else "torch.load(weights_only=True) refused it"
            raise CheckpointError(f"{file}: not a plain RNG state ({what}); refused without loading it") from None
    else:
        log.info(f"moeforge: {path} has no RNG state for rank {runtime.rank} (saved by fewer ranks); this rank keeps its seeded RNG")


def rng_state() -> dict[str, Any]:
    """This process's RNG state: the CPU generator's and (when CUDA is there) every device's."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore an ``rng_state()`` (its CUDA part only where CUDA is there)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
