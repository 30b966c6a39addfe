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

Defaults come from the default model's healthy run (``python -m launch.train``: tiny model, 4 MoE
layers of 8 experts, 300 steps, 30 windows of 10 steps): max/min load at most 16.8 (one window at
step 20; at most 5.2 after step 30 and 3.8 after step 70), no dead expert in any window, entropy at
least 1.48 nats = 0.71 ln 8. Early windows can spike alone (27.9 once at step 20 with
``data.max_bytes=2000000``), hence ``windows`` in a row and a wide margin: max/min 50, dead 0.25,
entropy 0.1 ln E. A collapsed router (every token on the same k experts) crosses all three at once.
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
    max_min_load: float = 50.0
    """Warn above this max/min expert load (healthy default run: at most 16.8 in any window)."""
    dead_fraction: float = 0.25
    """Warn above this share of experts without a token in the window (healthy default run: 0)."""
    min_entropy_frac: float = 0.1
    """Warn below this fraction of ln E mean router entropy (healthy default run: at least 0.71)."""

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
