"""Free space of ``checkpoint.dir`` against the size of a checkpoint: warn early, stop cleanly, say why.

A checkpoint needs about as many bytes as the last one took (the model and optimizer do not grow).
Before each save every rank measures the free space of ``checkpoint.dir`` (``os.statvfs``: blocks
available to an unprivileged user x fragment size) and the size of the newest published
checkpoint, and the ranks agree on the worst verdict (one small all-reduce per save):

- fewer than two checkpoints fit: one warning line (the save after this one would fail);
- one does not fit: ``DiskFullError`` before anything is written, so no half-written checkpoint is
  published or even started, the older checkpoints stay as they are, and the run exits with one line
  (status 2). Freeing space and rerunning the same command resumes from the newest checkpoint.

The first save has no earlier checkpoint to measure; it is not checked in advance. A write that
fails anyway (the first save, another process filling the disk, a quota) is told by
``describe_write_error``: the OS error's name (``No space left on device``, ``Disk quota exceeded``,
``Read-only file system``), the path, the bytes needed and the bytes free, in one line. When the
failing library hides the OS error (torch's zip writer reports ``unexpected pos``), the line names
the condition it finds from ``statvfs``: a read-only mount, or fewer free bytes than needed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from moe.errors import MoeforgeError
from parallel import Runtime

log = logging.getLogger("moeforge")

OK, WARN, STOP = 0, 1, 2
"""Verdicts of ``check_space``, ordered so the ranks' maximum is the worst."""

_NAMED = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS"}


class DiskFullError(MoeforgeError):
    """A checkpoint does not fit in ``checkpoint.dir``, or writing one failed for lack of space."""


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (``checkpoint.dir`` may not exist before the first save)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (``f_bavail * f_frsize``)."""
    st = os.statvfs(existing_parent(path))
    return int(st.f_bavail) * int(st.f_frsize)


def read_only(path: Path) -> bool:
    """Whether the filesystem holding ``path`` is mounted read-only (``ST_RDONLY``)."""
    return bool(os.statvfs(existing_parent(path)).f_flag & os.ST_RDONLY)


def directory_bytes(path: Path) -> int:
    """Total size of the files directly in checkpoint directory ``path`` (0 when it is gone)."""
    try:
        return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
    except OSError:
        return 0


@dataclass(frozen=True)
class Space:
    """One rank's measurement: free bytes of ``checkpoint.dir`` and the bytes one checkpoint needs (0: unknown)."""

    free: int
    need: int

    @property
    def verdict(self) -> int:
        if self.need <= 0:
            return OK
        if self.free < self.need:
            return STOP
        return WARN if self.free < 2 * self.need else OK


def measure(directory: Path, last: Path | None) -> Space:
    """Free bytes of ``directory`` and the size of ``last`` (the newest published checkpoint, or None)."""
    return Space(free_bytes(directory), directory_bytes(last) if last is not None else 0)


def check_space(directory: Path, last: Path | None, step: int, runtime: Runtime) -> Space:
    """Before saving step ``step``: warn when fewer than two checkpoints fit, raise ``DiskFullError``
    when one does not (same decision on every rank); returns this rank's measurement."""
    space = measure(directory, last)
    flags = torch.tensor([float(space.verdict)], device=runtime.device)
    runtime.all_reduce_max_([flags])
    verdict = int(flags.item())
    if verdict == STOP:
        where = f"rank {runtime.rank}: " if runtime.world_size > 1 and space.verdict == STOP else ""
        raise DiskFullError(
            f"{where}not enough space for checkpoint step {step} in {directory}: it needs about {_b(space.need)} "
            f"(the size of {last.name if last else 'the last checkpoint'}) but {_b(space.free)} are free; nothing was "
            f"written, the existing checkpoints are untouched; free space (or lower checkpoint.keep) and rerun to resume")
    if verdict == WARN:
        log.warning(f"moeforge: checkpoint.dir {directory} has {_b(space.free)} free, room for fewer than two more "
                    f"checkpoints of {_b(space.need)}; the next save but one will stop the run unless space is freed")
    return space


def os_errors(err: BaseException) -> Iterator[OSError]:
    """Every ``OSError`` in ``err``'s cause/context chain and in DCP's per-rank failures, outermost first."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            yield e
        if isinstance(e, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values() if isinstance(f, (tuple, BaseException))]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def describe_write_error(err: BaseException, step: int, path: Path, need: int) -> str:
    """One line for a checkpoint write that failed: the OS error, ``path``, bytes needed and free.

    The errno comes from the exception chain when the OS error reached Python; otherwise from what
    the filesystem shows now (read-only, or fewer free bytes than ``need``); otherwise the first
    line of the library's own message.
    """
    found = next(iter(os_errors(err)), None)
    free = free_bytes(path)
    code = found.errno if found is not None and found.errno else None
    if code is None:
        if read_only(path):
            code = errno.EROFS
        elif need > 0 and free < need:
            code = errno.ENOSPC
    if code is not None:
        what = f"{os.strerror(code)} ({_NAMED.get(code, errno.errorcode.get(code, str(code)))})"
    else:
        first = str(err).strip().splitlines()
        what = f"{type(err).__name__}: {first[0] if first else ''}"
    needed = f"needs about {_b(need)}" if need > 0 else "size unknown (first checkpoint)"
    return f"could not write checkpoint step {step} into {path}: {what}; {needed}, {_b(free)} free"


def _b(n: int) -> str:
    """Bytes as an exact count with a readable size, e.g. ``3,221,225 bytes (3.07 MiB)``."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n:,} bytes ({size:.2f} {unit})" if unit != "B" else f"{n:,} bytes"
