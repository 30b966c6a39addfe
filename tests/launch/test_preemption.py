"""Stop signals become a flag; the per-step guard agrees on it and applies train.on_nonfinite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from launch.preemption import AgentWatch, Preempted, StopSignals, signal_number
from launch.step_guard import NonFiniteError, StepGuard
from moe.errors import ConfigError
from parallel import Runtime
from tests.launch.test_train import REPO


def test_signal_names_are_checked() -> None:
    assert signal_number("SIGUSR1") == signal.SIGUSR1
    for bad in ("SIGKILL", "SIGTERMX", "TERM", "SIG_DFL"):
        with pytest.raises(ConfigError, match="train.stop_signals"):
            signal_number(bad)
    assert Preempted(signal.SIGTERM, "x").exit_code == 143 and Preempted(signal.SIGINT, "x").exit_code == 130


def test_stop_signal_is_recorded_not_fatal_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGTERM", "SIGUSR1"]) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second, different signal does not replace the first
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_second_sigint_aborts_only_outside_torchrun() -> None:
    with StopSignals(["SIGINT"], abort_on_second_sigint=False) as stop:  # under torchrun: Ctrl-C arrives twice
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
    code = ("import os, signal, time; from launch.preemption import StopSignals\n"
            "with StopSignals(['SIGINT']):\n    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); time.sleep(5)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 130 and out.stderr == "moeforge: second SIGINT: stopping now without saving\n"


def _guard(policy: str, signals: StopSignals | None = None) -> StepGuard:
    return StepGuard(Runtime(), policy, 2, signals or StopSignals([]), AgentWatch())


def test_guard_verdicts() -> None:
    g = _guard("stop")
    v = g.check(torch.tensor(2.0), torch.tensor(1.0))
    assert (v.nonfinite, v.signum, v.agent_gone) == (False, 0, False)
    assert g.check(torch.tensor(float("nan")), torch.tensor(1.0)).nonfinite
    assert g.check(torch.tensor(2.0), torch.tensor(float("inf"))).nonfinite
    with StopSignals(["SIGUSR1"]) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _guard("stop", stop).check().signum == signal.SIGUSR1


def test_nonfinite_stop_names_step_values_and_the_fix() -> None:
    with pytest.raises(NonFiniteError, match=r"step 8: loss nan, gradient norm inf \(rank 0\) is not finite; stopped before the optimizer "
                                             r"step \(train.on_nonfinite=stop\), nothing saved after ckpt/step_00000005. Lower optim.lr"):
        _guard("stop").on_nonfinite(7, torch.tensor(float("nan")), torch.tensor(float("inf")), "ckpt/step_00000005")
    with pytest.raises(NonFiniteError, match=r"first step after resuming from ckpt/step_00000007.*checkpoint.resume=never"):
        _guard("stop").on_nonfinite(7, torch.tensor(float("nan")), torch.tensor(1.0), "ckpt/step_00000007", resumed_at=7)


def test_skip_counts_and_stops_past_the_limit() -> None:
    g = _guard("skip")
    nan = torch.tensor(float("nan"))
    g.on_nonfinite(1, nan, nan, "-")
    g.on_finite()
    g.on_nonfinite(3, nan, nan, "-")
    g.on_nonfinite(4, nan, nan, "-")
    assert g.skipped_total == 3
    with pytest.raises(NonFiniteError, match=r"2 steps in a row were already skipped \(train.max_consecutive_skips=2\)"):
        g.on_nonfinite(5, nan, nan, "-")
