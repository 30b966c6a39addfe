"""Views of the logged routing statistics that keep expert identity, shared by every reader.

Shape legend: E experts, S log steps.

The trainer logs ``routing/layer{i}/tokens_per_expert`` as a list of routed token-slots per expert
(``moe/stats.py``). The W&B sink (``launch/metrics.py``), the dashboard (``tools/wandb_dashboard.py``)
and the PNG plotter (``tools/plot_routing.py``) all derive from it here, so the three agree:

- ``routing/layer{i}/load/e{j:02d}``: expert j's share of the layer's token-slots, ``n_j / sum_e n_e``
  (all zero in a window with no token-slot), one scalar per expert so a chart keeps identity.
- the load matrix: those shares, experts x log steps, drawn as a heatmap.

Layer stats the dashboard and the plotter chart (``LAYER_PANELS``) are keys of
``RoutingStats.summarize`` plus ``flips`` from evaluations; ``test_wandb_dashboard`` checks each
against a real run's keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

LOAD_LIST = re.compile(r"^routing/layer(\d+)/tokens_per_expert$")

LAYER_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("load CV (std/mean)", ("load_cv",)),
    ("max / min load", ("max_min_load",)),
    ("dead experts (fraction)", ("dead_fraction",)),
    ("router entropy (nats)", ("entropy",)),
    ("top-1 flips on the probe batch", ("flips",)),
    ("experts per token", ("experts_per_token_mean", "experts_per_token_max")),
    ("dropped fraction", ("dropped_frac",)),
    ("aux and z loss", ("aux_loss", "z_loss")),
)
"""(title, stat names) of each line chart per layer, in display order; keys are ``layer_key(i, stat)``."""


def layer_key(layer: int, stat: str) -> str:
    """The logged key of one layer statistic, e.g. ``routing/layer2/entropy``."""
    return f"routing/layer{layer}/{stat}"


def expert_load_key(layer: int, expert: int) -> str:
    """The W&B key of one expert's load share, e.g. ``routing/layer0/load/e03``."""
    return layer_key(layer, f"load/e{expert:02d}")


def heatmap_key(layer: int) -> str:
    """The W&B key of a layer's experts x steps load heatmap image."""
    return layer_key(layer, "load_heatmap")


def load_fractions(counts: Sequence[float]) -> list[float]:
    """Each expert's share of the token-slots, ``n_e / sum(n)``; zeros when nothing was routed."""
    total = float(sum(counts))
    return [float(c) / total if total > 0 else 0.0 for c in counts]


def per_expert_loads(metrics: Mapping[str, Any]) -> dict[int, list[float]]:
    """Layer index -> load shares, for every ``tokens_per_expert`` list in one metrics dict."""
    out: dict[int, list[float]] = {}
    for key, value in metrics.items():
        match = LOAD_LIST.match(key)
        if match and isinstance(value, list):
            out[int(match.group(1))] = load_fractions(value)
    return out


def per_expert_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """One scalar per (layer, expert): ``routing/layer{i}/load/e{j:02d}`` -> share of the load."""
    return {expert_load_key(layer, j): share
            for layer, shares in per_expert_loads(metrics).items() for j, share in enumerate(shares)}


def load_matrix(rows: Iterable[Mapping[str, Any]], layer: int) -> tuple[list[int], np.ndarray]:
    """(steps, load_ES): the log steps that carry layer ``layer``'s load and the shares, experts x steps.

    Rows without that layer's ``tokens_per_expert`` (evaluation-only rows) are skipped.
    """
    key = layer_key(layer, "tokens_per_expert")
    steps, columns = [], []
    for row in rows:
        if isinstance(row.get(key), list):
            steps.append(int(row["step"]))
            columns.append(load_fractions(row[key]))
    if not columns:
        return [], np.zeros((0, 0))
    return steps, np.asarray(columns, dtype=np.float64).T


def routing_layers(rows: Iterable[Mapping[str, Any]]) -> list[int]:
    """Sorted indices of the MoE layers whose load appears in any row."""
    return sorted({layer for row in rows for layer in per_expert_loads(row)})


def draw_load_heatmap(ax: Any, steps: Sequence[int], load_ES: np.ndarray, title: str) -> Any:
    """Draw experts (rows) x log steps (columns) shares on a matplotlib ``ax``; returns the image.

    The colour scale runs from 0 to at least twice the balanced share 1/E, so a balanced layer
    is mid-scale and an overloaded expert stands out.
    """
    E = load_ES.shape[0]
    vmax = max(2.0 / max(E, 1), float(load_ES.max()) if load_ES.size else 0.0)
    first, last = (steps[0], steps[-1]) if steps else (0, 1)
    half = (last - first) / max(len(steps) - 1, 1) / 2 if len(steps) > 1 else 0.5
    image = ax.imshow(load_ES, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
                      interpolation="nearest", extent=(first - half, last + half, -0.5, E - 0.5))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    if E <= 16:
        ax.set_yticks(range(E))
    return image


def heatmap_png(steps: Sequence[int], load_ES: np.ndarray, title: str) -> bytes:
    """A standalone PNG of one layer's load heatmap with a colour bar (matplotlib, no pyplot state)."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.0 + 0.12 * load_ES.shape[0]), dpi=80, layout="constrained")
    ax = fig.add_subplot()
    image = draw_load_heatmap(ax, steps, load_ES, title)
    fig.colorbar(image, ax=ax, label="share of token-slots")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
