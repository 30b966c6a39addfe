"""Metric sinks: ``metrics.jsonl``, W&B (offline by default), and the console progress line.

The trainer builds one flat dict per log step (``step``, ``loss``, ``lr``, ``tokens_per_s``,
``routing/layer{i}/{stat}``, ...) and hands it to every sink. Only rank 0 builds sinks; other
ranks get ``NullSink`` with the same methods. W&B is imported lazily, so ``logging=none`` never
imports it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per call to ``path`` (kept across resumes: lines are only added)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics, allow_nan=False, default=float) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """A W&B run in ``mode`` (offline | online) under ``run_dir``; per-expert loads as histograms."""

    def __init__(self, mode: str, project: str, entity: str | None, name: str | None, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb  # lazy: only when W&B logging is on

        self._wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, name=name, dir=str(run_dir), mode=mode, config=config,
            settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True),
        )

    def log(self, metrics: dict[str, Any]) -> None:
        out = {k: (self._wandb.Histogram(v) if isinstance(v, list) else v) for k, v in metrics.items() if k != "step"}
        self.run.log(out, step=int(metrics["step"]))

    def close(self) -> None:
        self.run.finish()


class Progress:
    """One console line per update: a bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, start: int = 0) -> None:
        self.total, self.start = total, start
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        line = f"[{bar}] step {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s eta {eta:.0f}s {extra}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(110))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
