"""Metric sinks: NaN/Inf never crash metrics.jsonl; a resume drops the lines it will log again."""

from __future__ import annotations

import json
from pathlib import Path

from launch.metrics import JsonlSink, finite_or_null, truncate_after


def test_nonfinite_values_are_written_as_null(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5, "routing/layer0/tokens_per_expert": [1, 2],
              "nested": {"x": -float("inf")}, "hist": [1.0, float("nan")]})
    sink.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 0.5, "routing/layer0/tokens_per_expert": [1, 2],
                   "nested": {"x": None}, "hist": [1.0, None]}
    assert finite_or_null(2.5) == 2.5 and finite_or_null("nan") == "nan"


def test_resume_drops_lines_after_its_step_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # killed mid-line
    assert truncate_after(path, 4) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    sink = JsonlSink(path, resume_step=4)
    sink.log({"step": 5, "loss": 0.2})
    sink.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert truncate_after(path, 5) == 0 and not list(tmp_path.glob("*.tmp-*"))
    JsonlSink(path, resume_step=0).close()  # a fresh start keeps nothing
    assert path.read_text() == ""
