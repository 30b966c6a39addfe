"""Graceful preemption: stop signals become a flag the train loop acts on, and a lost torchrun agent is noticed.

``StopSignals`` replaces the handlers of ``train.stop_signals`` (default SIGTERM, SIGINT and
SIGUSR1, which SLURM sends ahead of a time limit with ``--signal``) for the duration of a run: a
signal only records itself, the loop finishes its step, saves a checkpoint, logs one line and the
process exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT): the shell's code for
"ended by that signal", which job systems treat as retryable (Kubeflow's ``restartPolicy:
ExitCode`` retries 128-255 and fails 1-127; moeforge's own errors exit 2). Outside torchrun, a
second SIGINT aborts at once without saving (a user pressing Ctrl-C twice). Under torchrun a
repeated signal changes nothing: Ctrl-C reaches the workers directly and again through the agent,
and SLURM and the agent both deliver SIGTERM.

``AgentWatch`` notices that a torchrun worker's agent is gone (its parent process changed, as it
does when the agent is killed with SIGKILL and the workers are re-parented): such a worker must
stop instead of writing on, because a relaunch may already be writing the same run.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

from moe.errors import ConfigError

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def signal_number(name: str) -> int:
    """``signal.SIGTERM`` for ``"SIGTERM"``; ``ConfigError`` naming ``train.stop_signals`` otherwise."""
    sig = getattr(signal, name, None) if name.startswith("SIG") and not name.startswith("SIG_") else None
    if not isinstance(sig, signal.Signals) or name in UNCATCHABLE:
        raise ConfigError(f"train.stop_signals ({name!r}) must name catchable signals such as SIGTERM, SIGINT, SIGUSR1")
    return int(sig)


class Preempted(Exception):
    """Raised by the train loop after it saved because of a stop signal; carries the exit code."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: while active, the named signals set ``received`` instead of ending the process."""

    def __init__(self, names: list[str], abort_on_second_sigint: bool = True) -> None:
        self.numbers = [signal_number(n) for n in names]
        self.abort_on_second_sigint = abort_on_second_sigint
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT and self.abort_on_second_sigint:
            sys.stderr.write("moeforge: second SIGINT: stopping now without saving\n")
            os._exit(128 + signum)
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        for num in self.numbers:
            self._previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for num, previous in self._previous.items():
            signal.signal(num, previous)
        self._previous.clear()


class AgentWatch:
    """Under torchrun, tells whether this worker's agent (its parent process) is still there."""

    def __init__(self) -> None:
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self.agent_pid = os.getppid()

    def gone(self) -> bool:
        return self.under_torchrun and os.getppid() != self.agent_pid
