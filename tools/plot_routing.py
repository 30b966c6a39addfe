"""Draw a run's routing statistics as PNGs from ``metrics.jsonl``, for users without W&B.

    .venv/bin/python -m tools.plot_routing RUN_DIR [--out DIR]     # DIR defaults to RUN_DIR/routing_plots

One file per MoE layer, ``layer{i}.png``: the load heatmap (share of token-slots per expert, experts
x log steps) on top, then the dashboard's line charts in the same order (``LAYER_PANELS`` in
``launch/routing_view.py``): load CV, max/min load, dead-expert fraction, router entropy, top-1
flips, experts per token, dropped fraction, aux and z loss. A chart whose keys the run never logged
(flips before a second evaluation) says so instead of drawing an empty axis.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from launch.routing_view import LAYER_PANELS, draw_load_heatmap, layer_key, load_matrix, routing_layers


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` in file order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar key over the rows that carry it (a ``null``, i.e. NaN/Inf, is skipped)."""
    steps, values = [], []
    for row in rows:
        if isinstance(row.get(key), (int, float)):
            steps.append(int(row["step"]))
            values.append(float(row[key]))
    return steps, values


def plot_layer(rows: Sequence[Mapping[str, Any]], layer: int, path: Path) -> None:
    """Write one layer's figure (heatmap + line charts) to ``path`` as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 11), dpi=72, layout="constrained")
    grid = fig.add_gridspec(1 + (len(LAYER_PANELS) + 1) // 2, 2, height_ratios=[1.6] + [1] * ((len(LAYER_PANELS) + 1) // 2))
    heat_ax = fig.add_subplot(grid[0, :])
    steps, load_ES = load_matrix(rows, layer)
    image = draw_load_heatmap(heat_ax, steps, load_ES, f"layer {layer}: share of token-slots per expert")
    fig.colorbar(image, ax=heat_ax, label="share")
    for n, (title, stats) in enumerate(LAYER_PANELS):
        ax = fig.add_subplot(grid[1 + n // 2, n % 2])
        ax.set_title(title, fontsize=9)
        drawn = False
        for stat in stats:
            xs, ys = series(rows, layer_key(layer, stat))
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=stat)
                drawn = True
        if drawn:
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            if len(stats) > 1:
                ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.savefig(path, format="png")


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Draw every MoE layer of ``run_dir``; returns the PNG paths (``out`` defaults to run_dir/routing_plots)."""
    rows = read_rows(run_dir)
    out = out or run_dir / "routing_plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in routing_layers(rows):
        paths.append(out / f"layer{layer}.png")
        plot_layer(rows, layer, paths[-1])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="where to write layer{i}.png (default: RUN_DIR/routing_plots)")
    args = parser.parse_args(argv)
    paths = plot_run(args.run_dir, args.out)
    if not paths:
        raise SystemExit(f"{args.run_dir}/metrics.jsonl has no routing/layer*/tokens_per_expert")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
