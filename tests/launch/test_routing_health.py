"""Routing-health warnings: a collapsed router warns within N log windows; the default run raises none."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from launch.routing_health import HealthConfig, RoutingHealth
from tests.launch.test_train import SMALL, launch


def _row(layer: int, max_min: float, dead: float, entropy: float, experts: int = 8) -> dict:
    p = f"routing/layer{layer}/"
    return {p + "max_min_load": max_min, p + "dead_fraction": dead, p + "entropy": entropy, p + "tokens_per_expert": [1] * experts}


def test_each_threshold_alone_warns_after_n_windows_once_and_rearms() -> None:
    health = RoutingHealth(HealthConfig(windows=3, max_min_load=10, dead_fraction=0.25, min_entropy_frac=0.1))
    healthy = _row(0, 2.0, 0.0, 1.9)
    for bad in (_row(0, 11.0, 0.0, 1.9), _row(0, 2.0, 0.375, 1.9), _row(0, 2.0, 0.0, 0.1 * math.log(8) - 0.01)):
        seen = [health.check(bad) for _ in range(5)]
        assert [len(w) for _, w in seen] == [0, 0, 1, 0, 0]  # once, at the third window in a row
        assert [f["routing/layer0/unhealthy_windows"] for f, _ in seen] == [1, 2, 3, 4, 5]
        assert "routing/layer0/health_warning" in seen[2][0] and "routing/layer0/health_warning" not in seen[3][0]
        flags, warnings = health.check(healthy)  # re-arms
        assert not warnings and flags["routing/layer0/unhealthy_windows"] == 0
    # A layer at the thresholds exactly is healthy; layers are counted apart.
    edge = {**_row(0, 10.0, 0.25, 0.1 * math.log(8)), **_row(1, 50.0, 0.0, 2.0)}
    for _ in range(3):
        flags, warnings = health.check(edge)
    assert flags["routing/layer0/unhealthy_windows"] == 0 and [layer for layer, _ in warnings] == [1]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_collapsed_router_warns_within_n_windows(tmp_path: Path) -> None:
    out = launch(tmp_path, *SMALL, "train.steps=12", "train.log_every=2", "logging.health.windows=3", fault={"collapse_router": True})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in _rows(tmp_path) if "loss" in r]
    warned = [r["step"] for r in rows if r.get("routing/layer0/health_warning") == 1.0]
    assert warned == [6], warned  # the third window of 2 steps, once
    assert rows[0]["routing/layer0/dead_fraction"] == 0.5  # 2 of 4 experts get every token
    lines = [ln for ln in out.stderr.splitlines() if "routing unhealthy" in ln]
    assert len(lines) == 2 and all(ln.startswith("moeforge: step 6: MoE layer ") for ln in lines), out.stderr  # both layers


@pytest.mark.slow
def test_default_model_raises_no_routing_warning(tmp_path: Path) -> None:
    out = launch(tmp_path, "logging=none", "train.threads=1", "train.steps=100", "data.max_bytes=2000000", "train.eval_every=100")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "routing unhealthy" not in out.stderr
    rows = [r for r in _rows(tmp_path) if "loss" in r]
    assert len(rows) == 10 and not any(k.endswith("health_warning") for r in rows for k in r)
    assert max(v for r in rows for k, v in r.items() if k.endswith("unhealthy_windows")) < 5  # a lone early window may cross
