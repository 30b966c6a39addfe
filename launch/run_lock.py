"""One writer per run directory: an exclusive lock that names its holder.

``RunLock(directory).acquire()`` takes an exclusive ``flock`` on ``<directory>/moeforge.lock`` and
writes the holder (host, pid, start time, command) into it. The kernel drops the lock when the
holder exits, however it exits (a ``kill -9`` included), so a lock can never outlive its process;
a file that still names a holder while nobody holds the lock is a stale record of a process that
was killed, reported in one line and overwritten. A second launch into the same directory fails at
start, before any data or model exists, with ``RunLockedError`` naming the holder.

Linux NFS clients implement ``flock`` with NFS byte-range locks, so the lock also holds across
hosts there (flock(2), "NFS details"). On a filesystem without lock support moeforge refuses to
run rather than run unprotected, and says which file it could not lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from moe.errors import MoeforgeError
from parallel import Runtime

log = logging.getLogger("moeforge")

LOCK_FILE = "moeforge.lock"


class RunLockedError(MoeforgeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The exclusive lock of one directory (a run directory or a checkpoint directory)."""

    def __init__(self, directory: str | Path, purpose: str = "run directory") -> None:
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None
        """The record a killed holder left behind, when ``acquire`` found one."""

    def acquire(self) -> None:
        """Take the lock or raise: ``RunLockedError`` naming the holder, ``MoeforgeError`` if not writable."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MoeforgeError(f"{self.purpose} {self.dir} is not writable: {err.strerror} ({self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_record(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"{self.purpose} {self.dir} is in use by {describe(holder)}; wait for that run to end "
                                     f"or stop it, or write elsewhere (MOEFORGE_RUN_ID=<name>, hydra.run.dir=..., checkpoint.dir=...)") from None
            raise MoeforgeError(f"cannot lock {self.path} ({err.strerror}); moeforge needs a filesystem with flock "
                                f"support to keep one writer per {self.purpose}") from None
        self.stale = _read_record(fd) or None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: deleting it would race a new holder)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def describe(record: dict[str, Any] | None, command: bool = True) -> str:
    """``pid 4242 on host node3 (since 2026-01-01 10:00:00: launch/train.py ...)``; ``command=False`` drops the command."""
    if not record or "pid" not in record:
        return "another process (it left no record)"
    what = f": {record.get('command', '?')}" if command else ""
    return f"pid {record['pid']} on host {record.get('host', '?')} (since {record.get('since', '?')}{what})"


@contextmanager
def hold(runtime: Runtime, dirs: list[tuple[Path, str]]) -> Iterator[None]:
    """Rank 0 locks every ``(directory, purpose)`` for the body; all ranks fail together if it cannot.

    Each distinct directory is locked once (a checkpoint dir inside the run dir is still locked on
    its own: another run may point its ``checkpoint.dir`` there).
    """
    unique: dict[Path, str] = {}
    for directory, purpose in dirs:
        unique.setdefault(Path(directory).resolve(), purpose)
    with ExitStack() as stack:
        error: MoeforgeError | None = None
        stale: dict[str, Any] | None = None
        if runtime.is_main:
            try:
                for directory, purpose in unique.items():
                    lock = RunLock(directory, purpose)
                    lock.acquire()
                    stack.callback(lock.release)
                    stale = stale or lock.stale
            except MoeforgeError as err:
                error = err
            if stale and error is None:
                log.info(f"moeforge: the run's previous writer, {describe(stale, command=False)}, ended without releasing "
                         f"its lock (killed?); lock taken over")
        failed = torch.tensor([1.0 if error is not None else 0.0], device=runtime.device)
        runtime.all_reduce_max_([failed])
        if error is not None:
            raise error
        if failed.item():
            raise MoeforgeError("rank 0 could not lock the run's directories (its message says why)")
        yield
