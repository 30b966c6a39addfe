"""tools.plot_routing: the heatmap matrix equals the logged loads, and a real run's PNGs are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launch.routing_view import load_matrix
from tests.launch.test_train import SMALL, launch
from tools.plot_routing import main, plot_run, read_rows, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_load_matrix_matches_a_hand_built_example() -> None:
    rows = [
        {"step": 5, "routing/layer2/tokens_per_expert": [1, 3, 0], "routing/layer0/tokens_per_expert": [9, 9, 9]},
        {"step": 6, "val_loss": 1.0},  # an evaluation-only row carries no load
        {"step": 10, "routing/layer2/tokens_per_expert": [2, 2, 4]},
        {"step": 15, "routing/layer2/tokens_per_expert": [0, 0, 0]},  # nothing routed: zero shares, not NaN
    ]
    steps, load_ES = load_matrix(rows, 2)
    assert steps == [5, 10, 15]
    assert load_ES.tolist() == [[0.25, 0.25, 0.0], [0.75, 0.25, 0.0], [0.0, 0.5, 0.0]]
    no_steps, empty = load_matrix(rows, 1)
    assert no_steps == [] and empty.shape == (0, 0)
    assert series(rows + [{"step": 20, "val_loss": None}], "val_loss") == ([6], [1.0])


def test_real_run_draws_one_valid_png_per_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    done = launch(run_dir, *SMALL, "train.steps=6", "train.log_every=2", "train.eval_every=3", "train.eval_batches=1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert read_rows(run_dir) == rows
    for layer in (0, 1):
        loaded = [r for r in rows if f"routing/layer{layer}/tokens_per_expert" in r]
        steps, load_ES = load_matrix(rows, layer)
        assert steps == [r["step"] for r in loaded] == [2, 4, 6]
        for column, row in zip(load_ES.T, loaded):
            counts = np.array(row[f"routing/layer{layer}/tokens_per_expert"], dtype=np.float64)
            np.testing.assert_array_equal(column, counts / counts.sum())
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == ["layer0.png", "layer1.png"] and all(p.parent == run_dir / "routing_plots" for p in paths)
    main([str(run_dir), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "layer0.png"), str(tmp_path / "out" / "layer1.png")]
    from PIL import Image

    for path in [*paths, tmp_path / "out" / "layer1.png"]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size == (720, 792)


def test_a_run_without_routing_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(SystemExit, match="no routing"):
        main([str(tmp_path)])
