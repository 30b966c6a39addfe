"""One writer per run directory: the lock names its holder, survives nothing, refuses unwritable dirs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.run_lock import LOCK_FILE, RunLock, RunLockedError, hold
from moe.errors import MoeforgeError
from parallel import Runtime


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"run directory {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()} "
                                                 r"\(since .*\); wait for that run to end or stop it"):
            RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: the record is cleared
    with RunLock(tmp_path) as again:  # and it can be taken again
        assert again.stale is None


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path: Path) -> None:
    code = f"from launch.run_lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True)
    assert proc.returncode == -9
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.stale is not None and lock.stale["pid"] != os.getpid()
    lock.release()


def test_unwritable_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(MoeforgeError, match=r"checkpoint.dir /proc/x is not writable: .* \(/proc/x/moeforge.lock\)"):
        RunLock("/proc/x", "checkpoint.dir").acquire()


def test_a_checkpoint_dir_equal_to_the_run_dir_is_locked_once(tmp_path: Path) -> None:
    with hold(Runtime(), [(tmp_path, "run directory"), (tmp_path / ".", "checkpoint.dir"), (tmp_path / "ckpt", "checkpoint.dir")]):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert json.loads((tmp_path / "ckpt" / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match="checkpoint.dir .*/ckpt is in use by pid"):
            with hold(Runtime(), [(tmp_path / "ckpt", "checkpoint.dir")]):
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""
