"""The routing dashboard: its spec builds without a network, has a section per MoE layer, and every
panel reads a key that a real training run logs to W&B."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from launch.metrics import WandbSink
from tests.launch.test_metrics import offline_history
from tests.launch.test_train import SMALL, launch
from tools import wandb_dashboard
from tools.wandb_dashboard import build_workspace, layout_from_run, moe_layer_indices, panel_keys

pytest.importorskip("wandb_workspaces")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the dashboard spec must build without a network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_spec_has_a_section_per_moe_layer_plotted_against_the_step(no_network: None) -> None:
    workspace = build_workspace("ent", "proj", num_layers=4, num_experts=3, moe_every=2)
    assert moe_layer_indices(4, 2) == [1, 3]
    assert [s.name for s in workspace.sections] == ["training", "routing/layer1", "routing/layer3"]
    layer3 = workspace.sections[2].panels
    assert layer3[0].media_keys == ["routing/layer3/load_heatmap"]
    assert layer3[1].y == ["routing/layer3/load/e00", "routing/layer3/load/e01", "routing/layer3/load/e02"]
    assert [p.y for p in layer3[2:]] == [
        ["routing/layer3/load_cv"], ["routing/layer3/max_min_load"], ["routing/layer3/dead_fraction"], ["routing/layer3/entropy"],
        ["routing/layer3/flips"], ["routing/layer3/experts_per_token_mean", "routing/layer3/experts_per_token_max"],
        ["routing/layer3/dropped_frac"], ["routing/layer3/aux_loss", "routing/layer3/z_loss"]]
    spec = json.loads(workspace._to_model().model_dump_json(by_alias=True))  # what save() would upload
    assert spec["entity"] == "ent" and spec["project"] == "proj" and spec["spec"]["section"]["settings"]["xAxis"] == "trainer/step"
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    lines = [p["config"] for s in sections for p in s["panels"] if p["viewType"] == "Run History Line Plot"]
    assert len(lines) == 5 + 2 * 9 and {c["xAxis"] for c in lines} == {"trainer/step"}


def test_every_panel_key_is_logged_by_a_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short training run (two evaluations, so flips exist) replayed through the W&B sink offline:
    the dashboard built from its layout reads only keys in the run's W&B history."""
    run_dir = tmp_path / "run"
    done = launch(run_dir, *SMALL, "train.steps=6", "train.log_every=2", "train.eval_every=3", "train.eval_batches=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert layout_from_run(run_dir) == (2, 4, 1)
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink("offline", "p", None, None, tmp_path / "wb", {"logging": {"heatmap_every": 2}})
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        sink.log(json.loads(line))
    sink.close()
    logged = {key.removesuffix("/_type") for row in offline_history(tmp_path / "wb") if "_step" in row for key in row}
    workspace = build_workspace("ent", "proj", *layout_from_run(run_dir))
    assert panel_keys(workspace) - logged == set()
    assert {"routing/layer1/flips", "routing/layer1/load_heatmap", "routing/layer0/load/e03", "trainer/step"} <= panel_keys(workspace)


def test_main_saves_the_view(monkeypatch: pytest.MonkeyPatch, no_network: None, capsys: pytest.CaptureFixture) -> None:
    """Without --dry-run the spec goes to W&B's upsert (stubbed here: saving needs the network)."""
    import wandb_workspaces.workspaces.interface as interface

    sent = []

    def upsert(view):
        sent.append(view)
        return {"upsertView": {"view": {"name": "abc", "id": "id1"}}}

    monkeypatch.setattr(interface.internal, "upsert_view2", upsert)
    monkeypatch.setattr(interface.Workspace, "url", property(lambda self: f"view {self._internal_name}"))
    wandb_dashboard.main(["--entity", "ent", "--project", "proj", "--num-layers", "2", "--num-experts", "2"])
    assert len(sent) == 1 and sent[0].display_name == "moeforge routing" and "saved: view abc" in capsys.readouterr().out
