"""Routing-health warnings: an MoE layer that stays skewed, keeps experts idle or whose router
stays sure of one choice for ``logging.health.windows`` consecutive log windows.

Per MoE layer and log window, from the window's routing statistics (``moe/stats.py`` has the
formulas), a layer is *unhealthy* in a window when any of

- ``max_min_load`` > ``logging.health.max_min_load`` (the busiest expert's token-slots over the
  idlest one's, an idle expert counted as 1);
- ``dead_fraction`` > ``logging.health.dead_fraction`` (share of experts that got no token);
- ``entropy`` < ``logging.health.min_entropy_frac`` x ln E (mean router entropy, nats)

holds. After ``windows`` unhealthy windows in a row the trainer gets one warning for the layer: a
console line, a W&B alert (``Sink.alert``) and, in that window's row of ``metrics.jsonl``,
``routing/layer{i}/health_warning`` = 1. ``routing/layer{i}/unhealthy_windows`` (the current run
of unhealthy windows) is in every log row. A layer warns again only after a healthy window. The
count restarts with the process (a resumed run counts afresh).

Defaults come from the default model's healthy run (``python -m launch.train``, tiny model,
300 steps, 30 windows of 10 steps; README *Routing health* gives the figures) with a wide margin:
a healthy layer never comes close, and a collapsed one (every token on the same k experts) crosses
all three at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from moe.errors import check

_LAYER_STAT = re.compile(r"^routing/layer(\d+)/(max_min_load|dead_fraction|entropy|tokens_per_expert)$")


@dataclass(kw_only=True)
class HealthConfig:
    """``logging.health.*``: thresholds of the routing-health warning (module docstring)."""

    enabled: bool = True
    windows: int = 5
    """Consecutive unhealthy log windows before a layer warns."""
    max_min_load: float = 20.0
    """Warn above this max/min expert load."""
    dead_fraction: float = 0.25
    """Warn above this share of experts without a token in the window."""
    min_entropy_frac: float = 0.1
    """Warn below this fraction of ln E mean router entropy."""

    def __post_init__(self) -> None:
        check(self.windows >= 1, "logging.health.windows", self.windows, "must be >= 1")
        check(self.max_min_load >= 1, "logging.health.max_min_load", self.max_min_load, "must be >= 1")
        check(0 <= self.dead_fraction < 1, "logging.health.dead_fraction", self.dead_fraction, "must be in [0, 1)")
        check(0 <= self.min_entropy_frac <= 1, "logging.health.min_entropy_frac", self.min_entropy_frac, "must be in [0, 1]")


class RoutingHealth:
    """Counts each layer's consecutive unhealthy windows; ``check`` is called once per log row."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self.runs: dict[int, int] = {}

    def reasons(self, stats: dict[str, Any]) -> list[str]:
        """Which thresholds one layer's window statistics cross, each as ``name value (limit)``."""
        c, out = self.cfg, []
        if stats.get("max_min_load", 0.0) > c.max_min_load:
            out.append(f"max/min load {stats['max_min_load']:.1f} > {c.max_min_load:g}")
        if stats.get("dead_fraction", 0.0) > c.dead_fraction:
            out.append(f"dead experts {stats['dead_fraction']:.2f} > {c.dead_fraction:g}")
        experts = len(stats.get("tokens_per_expert", []))
        if "entropy" in stats and experts > 1 and stats["entropy"] < c.min_entropy_frac * math.log(experts):
            out.append(f"router entropy {stats['entropy']:.3f} < {c.min_entropy_frac:g} x ln {experts}")
        return out

    def check(self, metrics: dict[str, Any]) -> tuple[dict[str, float], list[tuple[int, str]]]:
        """``(flags for the metrics row, [(layer, warning text)])`` for one log row's routing statistics."""
        if not self.cfg.enabled:
            return {}, []
        layers: dict[int, dict[str, Any]] = {}
        for key, value in metrics.items():
            found = _LAYER_STAT.match(key)
            if found:
                layers.setdefault(int(found.group(1)), {})[found.group(2)] = value
        flags: dict[str, float] = {}
        warnings: list[tuple[int, str]] = []
        for layer, stats in sorted(layers.items()):
            reasons = self.reasons(stats)
            run = self.runs.get(layer, 0) + 1 if reasons else 0
            self.runs[layer] = run
            flags[f"routing/layer{layer}/unhealthy_windows"] = float(run)
            if run == self.cfg.windows:
                flags[f"routing/layer{layer}/health_warning"] = 1.0
                warnings.append((layer, f"MoE layer {layer}: routing unhealthy for {run} log windows in a row ({'; '.join(reasons)}); "
                                        f"thresholds are logging.health.*"))
        return flags, warnings
