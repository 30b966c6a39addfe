"""kill -9 at every filesystem operation of a checkpoint save and of the prune it ends with (tests/faults/kill_points.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch.test_train import REPO


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_kill_point_loses_a_checkpoint(mode: str) -> None:
    cmd = [sys.executable, "-m", "tests.faults.kill_points", "--writes", "12", *(["--async"] if mode == "async" else [])]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failures"] == [] and summary["lost"] == 0
    assert summary["points"] >= 25 and summary["prune_points"] >= 7
    ops = summary["ops"]
    for kind in ("open __0_0.distcp", "write __0_0.distcp", "rename .metadata.tmp -> .metadata", "open moeforge.json",
                 "unlink __0_0.distcp", "rmdir step_00000001.del-"):
        assert any(op.startswith(kind) for op in ops), kind
