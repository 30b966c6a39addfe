"""Fault injection at filesystem operations: count every mutation a process makes, SIGKILL it at a chosen one.

``FsOps.install()`` wraps the Python entry points that change files: ``open`` for writing (and each
``write`` on such a file), ``os.open`` with a write flag, ``os.rename``/``replace``, ``os.unlink``/
``remove``, ``os.rmdir``, ``os.mkdir``, ``os.ftruncate``. While armed, each one is numbered
(1, 2, ...) and named (``write __0_0.distcp``, ``rename step_3.tmp-ab -> step_3``); with a target
``kill_at``, the process kills itself with SIGKILL right before that operation runs, or, for a
write of more than one byte, after writing the first half of it (a torn write). Nothing is
cleaned up, flushed or unwound, as with ``kill -9``.

Only test code uses this; the trainer has no fault hooks.
"""

from __future__ import annotations

import builtins
import io
import os
import signal
import threading
from pathlib import Path
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class FsOps:
    """Numbers filesystem mutations while armed; optionally SIGKILLs the process at one of them."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.kill_match: tuple[str, int] | None = None
        """Or: kill at the n-th operation whose name contains this text (``("-> step_", 1)``: the publishing rename)."""
        self._matches = 0
        self.count = 0
        self.names: list[str] = []
        self.depth = 0
        """> 0 while the main thread is inside an armed region (``with ops.armed():``)."""
        self.background = False
        """Also count operations of other threads (DCP's async writer) once a region was entered."""
        self._orig: dict[str, Any] = {}

    def armed(self) -> _Armed:
        return _Armed(self)

    def _counting(self) -> bool:
        if threading.current_thread() is threading.main_thread():
            return self.depth > 0
        return self.background

    def op(self, name: str, data: bytes | None = None, write: Any = None) -> None:
        """Record one operation; at the target one, tear ``data``'s write with ``write`` if given, then SIGKILL."""
        if not self._counting():
            return
        self.count += 1
        self.names.append(name)
        hit = self.count == self.kill_at
        if self.kill_match is not None and self.kill_match[0] in name:
            self._matches += 1
            hit = hit or self._matches == self.kill_match[1]
        if hit:
            if data is not None and write is not None and len(data) > 1:
                write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        """Patch the ``os`` functions and ``open`` (process-wide, until ``uninstall``)."""
        ops = self
        o = self._orig
        o.update(open=builtins.open, rename=os.rename, replace=os.replace, unlink=os.unlink, remove=os.remove,
                 rmdir=os.rmdir, mkdir=os.mkdir, os_open=os.open, ftruncate=os.ftruncate)

        def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writing = any(c in mode for c in "wax+")
            if writing:
                ops.op(f"open {Path(str(file)).name} {mode}")
            f = o["open"](file, mode, *args, **kwargs)
            return _CountingFile(f, ops, Path(str(file)).name) if writing else f

        def _wrap(key: str, label: str) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                names = " -> ".join(Path(str(a)).name for a in args[:2] if isinstance(a, (str, os.PathLike)))
                ops.op(f"{label} {names}")
                return o[key](*args, **kwargs)
            return wrapped

        def _os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> Any:
            if flags & _WRITE_FLAGS:
                ops.op(f"os.open {Path(str(path)).name}")
            return o["os_open"](path, flags, *args, **kwargs)

        builtins.open = io.open = _open  # type: ignore[assignment]
        os.rename, os.replace = _wrap("rename", "rename"), _wrap("replace", "replace")
        os.unlink, os.remove = _wrap("unlink", "unlink"), _wrap("remove", "unlink")
        os.rmdir, os.mkdir = _wrap("rmdir", "rmdir"), _wrap("mkdir", "mkdir")
        os.ftruncate = _wrap("ftruncate", "ftruncate")
        os.open = _os_open  # type: ignore[assignment]

    def uninstall(self) -> None:
        o = self._orig
        builtins.open = io.open = o["open"]  # type: ignore[assignment]
        os.rename, os.replace, os.unlink, os.remove = o["rename"], o["replace"], o["unlink"], o["remove"]
        os.rmdir, os.mkdir, os.open, os.ftruncate = o["rmdir"], o["mkdir"], o["os_open"], o["ftruncate"]


class _Armed:
    def __init__(self, ops: FsOps) -> None:
        self.ops = ops

    def __enter__(self) -> FsOps:
        self.ops.depth += 1
        self.ops.background = True
        return self.ops

    def __exit__(self, *exc: object) -> None:
        self.ops.depth -= 1


class _CountingFile:
    """A file opened for writing whose every ``write`` is one numbered operation."""

    def __init__(self, f: Any, ops: FsOps, name: str) -> None:
        self._f, self._ops, self._name = f, ops, name

    def write(self, data: Any) -> int:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self._ops.op(f"write {self._name}", raw, self._torn_write)
        return self._f.write(data)

    def _torn_write(self, part: bytes) -> None:
        self._f.write(part.decode(errors="ignore") if isinstance(self._f, io.TextIOBase) else part)
        self._f.flush()

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)
