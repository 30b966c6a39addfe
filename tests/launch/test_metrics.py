"""Metric sinks: NaN/Inf never crash metrics.jsonl; a resume drops the lines it will log again; W&B
(real offline runs, read back from their files) keeps expert identity and plots against the step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launch.config import LoggingConfig
from launch.metrics import JsonlSink, WandbSink, finite_or_null, truncate_after
from moe.errors import ConfigError


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


def offline_history(run_dir: Path, timeout_s: float = 30.0) -> list[dict]:
    """Every history row and metric definition W&B wrote to the offline run files under ``run_dir``.

    Reads the ``.wandb`` transaction logs directly (a 7-byte ``:W&B`` header, then LevelDB-style
    32 KiB blocks of CRC-framed chunks, each full record a serialized ``Record`` protobuf), so the
    test sees what would be synced, not what the sink meant to send. Definitions come back as
    ``{"define": name, "step_metric": ...}`` rows. W&B's service may still be writing a file when
    ``finish()`` returns, so each file is read until it holds its run's exit record.
    """
    rows = []
    for path in sorted(run_dir.rglob("run-*.wandb")):
        deadline = time.monotonic() + timeout_s
        while (records := _read_records(path)) is None:
            assert time.monotonic() < deadline, f"{path} never got its exit record"
            time.sleep(0.05)
        for record in records:
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif record.HasField("metric"):
                rows.append({"define": record.metric.name or record.metric.glob_name, "step_metric": record.metric.step_metric})
    return rows


def _read_records(path: Path) -> list | None:
    """The records of one ``.wandb`` file, or None while it lacks the exit record (still being written)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            records.append(pb.Record())
            records[-1].ParseFromString(pending)
            pending = b""
    return records if any(r.HasField("exit") for r in records) else None


def _wandb_sink(run_dir: Path, heatmap_every: int) -> WandbSink:
    return WandbSink("offline", "moeforge-test", None, None, run_dir, {"logging": {"heatmap_every": heatmap_every}})


def test_wandb_sink_keeps_expert_identity_and_plots_against_the_training_step(tmp_path: Path, monkeypatch) -> None:
    """A real offline run: a known tokens_per_expert list becomes exact per-expert shares under
    keys that name the expert, a one-bin-per-expert histogram, and a heatmap every 2 load logs and
    at close; every key has ``trainer/step`` as its x axis."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = _wandb_sink(tmp_path, heatmap_every=2)
    loads = {10: [6, 0, 2, 0], 20: [1, 1, 1, 1], 30: [0, 0, 0, 4]}
    for step, counts in loads.items():
        sink.log({"step": step, "loss": 1.0 / step, "routing/layer1/tokens_per_expert": counts, "routing/layer1/dead_fraction": 0.5})
    sink.log({"step": 30, "val_loss": 2.0})  # an evaluation at the last log step
    sink.close()
    rows = offline_history(tmp_path / "wandb")
    defines = [r for r in rows if "define" in r]
    assert {"define": "*", "step_metric": "trainer/step"} in defines and {"define": "trainer/step", "step_metric": ""} in defines
    history = {r["_step"]: r for r in rows if "_step" in r}
    assert sorted(history) == [10, 20, 30] and all(history[s]["trainer/step"] == s for s in history)
    for step, counts in loads.items():
        row = history[step]
        assert [row[f"routing/layer1/load/e{j:02d}"] for j in range(4)] == [c / sum(counts) for c in counts]
        assert row["routing/layer1/tokens_per_expert/values"] == counts
        assert row["routing/layer1/tokens_per_expert/bins"] == [0, 1, 2, 3, 4]
        assert row["routing/layer1/dead_fraction"] == 0.5
    assert history[10]["routing/layer1/load/e00"] == 0.75 and history[30]["val_loss"] == 2.0
    assert [s for s in history if "routing/layer1/load_heatmap/_type" in history[s]] == [20, 30]  # 2nd load log, then close
    image = history[30]["routing/layer1/load_heatmap/path"]
    assert next(tmp_path.rglob(Path(image).name)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_wandb_sink_continues_the_run_and_its_heatmap_history(tmp_path: Path, monkeypatch) -> None:
    """A run crashed after step 3 and resumed at step 2: the W&B id is reused, the load history is
    re-read from metrics.jsonl (steps 1-2), and step 3's new values replace the crashed run's."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = JsonlSink(tmp_path / "metrics.jsonl")
    for step, counts in [(1, [3, 1]), (2, [2, 2]), (3, [4, 0])]:
        first.log({"step": step, "routing/layer0/tokens_per_expert": counts})
    first.close()
    (tmp_path / "wandb_id").write_text("abc123def456\n")
    JsonlSink(tmp_path / "metrics.jsonl", resume_step=2).close()
    sink = _wandb_sink(tmp_path, heatmap_every=100)
    assert sink.run.id == "abc123def456"
    sink.log({"step": 3, "routing/layer0/tokens_per_expert": [1, 3]})
    steps, load_ES = sink.load_history(0)
    assert steps == [1, 2, 3]
    assert load_ES.tolist() == [[0.75, 0.5, 0.25], [0.25, 0.5, 0.75]]
    sink.log({"step": 2, "routing/layer0/tokens_per_expert": [0, 1]})  # an earlier step replaces it and drops what follows
    assert sink.load_history(0)[0] == [1, 2] and sink.load_history(0)[1][:, -1].tolist() == [0.0, 1.0]
    sink.close()
    rows = offline_history(tmp_path / "wandb")
    assert {"define": "*", "step_metric": "trainer/step"} in rows
    assert [r["trainer/step"] for r in rows if "routing/layer0/load/e00" in r] == [3]  # W&B keeps its history monotonic
    heatmaps = [r for r in rows if "routing/layer0/load_heatmap/_type" in r]
    assert len(heatmaps) == 1 and heatmaps[0]["_step"] == 3  # drawn at close, merged into the last logged W&B step


def test_heatmap_every_zero_logs_no_image_and_config_rejects_negative(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = _wandb_sink(tmp_path, heatmap_every=0)
    sink.log({"step": 1, "routing/layer0/tokens_per_expert": [1, 0]})
    sink.close()
    rows = [r for r in offline_history(tmp_path / "wandb") if "_step" in r]
    assert len(rows) == 1 and rows[0]["routing/layer0/load/e00"] == 1.0 and not any("heatmap" in k for k in rows[0])
    with pytest.raises(ConfigError, match="logging.heatmap_every"):
        LoggingConfig(heatmap_every=-1)


def test_wandb_alert_is_kept_by_an_offline_run(tmp_path: Path, monkeypatch) -> None:
    """``Sink.alert`` (loss spikes): an offline run stores the alert in its run file for a later sync."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = _wandb_sink(tmp_path, heatmap_every=0)
    sink.log({"step": 1, "loss": 1.0})
    sink.alert("moeforge: loss spike", "loss spike at step 11: 48.18 > 6.83")
    sink.close()
    offline_history(tmp_path / "wandb")  # waits for the exit record
    path = next((tmp_path / "wandb").rglob("run-*.wandb"))
    alerts = [r.alert for r in _read_records(path) if r.HasField("alert")]
    assert [(a.title, a.text, a.level) for a in alerts] == [("moeforge: loss spike", "loss spike at step 11: 48.18 > 6.83", "WARN")]
