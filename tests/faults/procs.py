"""Subprocesses of the fault tests: each in its own process group, which is killed whatever happens.

A torchrun agent that times out, or a test that fails half-way, must not leave workers running
(they would hold a run's lock and a CPU). ``running`` starts a command in a new session and, on
the way out, SIGKILLs that session's process group: the command and everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.launch.test_train import REPO


@contextmanager
def running(cmd: list[str], env: dict[str, str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """``Popen(cmd)`` in the repository, in its own process group, killed with its children on exit."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, text=True, **kwargs)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(capture_output=True)``, but a timeout also kills what the command started."""
    with running(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_for_metrics(run_dir: Path, proc: subprocess.Popen, lines: int = 1, timeout: float = 120) -> None:
    """Return once ``metrics.jsonl`` has ``lines`` lines (training is under way); fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"no training progress in {run_dir} (exit {proc.poll()})")
