"""Metric sinks: ``metrics.jsonl``, W&B (offline by default), and the console progress line.

The trainer builds one flat dict per log step (``step``, ``loss``, ``lr``, ``tokens_per_s``,
``routing/layer{i}/{stat}``, ...) and hands it to every sink. Only rank 0 builds sinks; other
ranks get ``NullSink`` with the same methods. W&B is imported lazily, so ``logging=none`` never
imports it.

Across restarts the record stays true: a run resuming at step S first drops the lines of
``metrics.jsonl`` after S (they are recomputed, identically), and continues the same W&B run (its
id is kept in ``<run dir>/wandb_id``). A NaN or Inf is written to ``metrics.jsonl`` as ``null``
(JSON has no NaN); W&B receives it as is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from launch.logs import FILE_ONLY

log = logging.getLogger("moeforge")


class Sink(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per call to ``path``; a resumed run first drops the lines after its step."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(path, resume_step)
        self._file = path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(finite_or_null(metrics), allow_nan=False, default=float) + "\n")

    def close(self) -> None:
        self._file.close()


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN/Inf float (in dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def truncate_after(path: Path, step: int) -> int:
    """Drop the lines of ``path`` whose ``step`` is after ``step`` (and unreadable ones); returns how many.

    The file is rewritten atomically (a temporary file renamed over it), so a kill never leaves
    it half written. A run starting at step 0 keeps nothing.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("step", step + 1)) <= step
        except (ValueError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
        log.info(f"moeforge: {path.name}: dropped {dropped} line(s) after step {step}; the resumed run logs those steps again")
    return dropped


class WandbSink:
    """A W&B run in ``mode`` (offline | online) under ``run_dir``; per-expert loads as histograms.

    The run id is created once per run directory and kept in ``<run_dir>/wandb_id``; every restart
    continues that W&B run (``resume="allow"``). W&B keeps a run's history monotonic, so the steps a
    crashed run logged after its last checkpoint keep their first values (the same, as training is
    deterministic; ``tokens_per_s`` differs).
    """

    def __init__(self, mode: str, project: str, entity: str | None, name: str | None, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb  # lazy: only when W&B logging is on

        self._wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project, entity=entity, name=name, dir=str(run_dir), mode=mode, config=config, id=run_id, resume="allow",
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

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Print the step line from a log step's ``metrics`` (loss, throughput, MFU, memory, val loss)."""
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        parts = [f"[{bar}] step {step}/{self.total} loss {metrics['loss']:.4f}", f"{metrics['tokens_per_s']:,.0f} tok/s"]
        if "tflops_per_gpu" in metrics:
            parts.append(f"{metrics['tflops_per_gpu']:.3g} TFLOP/s/GPU")
        if "mfu" in metrics:
            parts.append(f"MFU {metrics['mfu']:.1%}")
        if "peak_mem_gib" in metrics:
            parts.append(f"mem {metrics['peak_mem_gib']:.2f} GiB")
        parts.append(f"eta {eta:.0f}s")
        if "val_loss" in metrics:
            parts.append(f"val {metrics['val_loss']:.4f}")
        line = " ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line.ljust(110))
            sys.stderr.flush()
            log.info(line, extra=FILE_ONLY)
        else:
            log.info(line)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
