"""Metric sinks: ``metrics.jsonl``, W&B (offline by default), and the console progress line.

The trainer builds one flat dict per log step (``step``, ``loss``, ``lr``, ``tokens_per_s``,
``routing/layer{i}/{stat}``, ...) and hands it to every sink. Only rank 0 builds sinks; other
ranks get ``NullSink`` with the same methods. W&B is imported lazily, so ``logging=none`` never
imports it. ``WandbSink`` adds views that keep expert identity (per-expert load shares, a load
heatmap); their formulas live in ``launch/routing_view.py``.

Across restarts the record stays true: a run resuming at step S first drops the lines of
``metrics.jsonl`` after S (they are recomputed, identically), and continues the same W&B run (its
id is kept in ``<run dir>/wandb_id``). A NaN or Inf is written to ``metrics.jsonl`` as ``null``
(JSON has no NaN); W&B receives it as is.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from launch.logs import FILE_ONLY
from launch.routing_view import LOAD_LIST, heatmap_key, heatmap_png, per_expert_loads, per_expert_scalars

log = logging.getLogger("moeforge")


class Sink(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...
    def alert(self, title: str, text: str) -> None: ...
    def rewind(self, step: int) -> None: ...
    def close(self) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def alert(self, title: str, text: str) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per call to ``path``; a resumed run first drops the lines after its step."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        truncate_after(path, resume_step)
        self._file = path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(finite_or_null(metrics), allow_nan=False, default=float) + "\n")

    def alert(self, title: str, text: str) -> None:
        """Alerts reach metrics.jsonl as the metrics row the trainer logs with them."""

    def rewind(self, step: int) -> None:
        """Drop the lines after ``step`` (a rollback to a checkpoint at ``step``), as a resume there would."""
        self._file.close()
        truncate_after(self.path, step)
        self._file = self.path.open("a", buffering=1)

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
    """A W&B run in ``mode`` (offline | online) under ``run_dir``, logging per-expert load with identity.

    Each log step is one ``run.log(..., step=step)`` carrying ``trainer/step`` too, with
    ``define_metric("*", step_metric="trainer/step")`` so every chart's x axis is the training step.
    Per MoE layer, beside the trainer's scalars (``launch/routing_view.py`` has the formulas):

    - ``routing/layer{i}/load/e{j:02d}``: expert j's share of the token-slots, one scalar per expert;
    - ``routing/layer{i}/tokens_per_expert``: a histogram with one bin per expert (bin j holds expert
      j's count, so W&B's histogram-over-steps panel is an experts x steps map; none past 512 experts);
    - ``routing/layer{i}/load_heatmap``: every ``heatmap_every`` log steps (and at ``close``), an
      image of the load shares, experts x every log step so far (0 turns it off; needs matplotlib).

    The run id is created once per run directory and kept in ``<run_dir>/wandb_id``; every restart
    continues that W&B run (``resume="allow"``) and re-reads the load history from
    ``<run_dir>/metrics.jsonl``, so a resumed run's heatmap starts at step 0 too. W&B keeps a run's
    history monotonic, so the steps a crashed run logged after its last checkpoint keep their first
    values (the same, as training is deterministic; ``tokens_per_s`` differs).
    """

    STEP = "trainer/step"

    def __init__(self, mode: str, project: str, entity: str | None, name: str | None, run_dir: Path, config: dict[str, Any],
                 heatmap_every: int | None = None) -> None:
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
        self.run.define_metric(self.STEP)  # defined again on every (re)start: definitions belong to the process
        self.run.define_metric("*", step_metric=self.STEP)
        if heatmap_every is None:  # the trainer hands over the composed config; logging.heatmap_every lives there
            heatmap_every = int((config.get("logging") or {}).get("heatmap_every", 10))
        if heatmap_every and importlib.util.find_spec("matplotlib") is None:
            log.warning("moeforge: no W&B load heatmaps: matplotlib is not installed (pip install -e '.[dashboard]')")
            heatmap_every = 0
        self.heatmap_every = heatmap_every
        self._loads: dict[int, dict[int, list[float]]] = {}  # layer -> step -> load shares, in step order
        self._load_logs = 0
        self._last_step = 0
        self._drawn_at = 0
        self._seed_history(run_dir / "metrics.jsonl")

    def _seed_history(self, path: Path) -> None:
        """Load shares of the steps already in ``metrics.jsonl`` (a resumed run's earlier steps)."""
        if not self.heatmap_every or not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                self._remember(int(row["step"]), per_expert_loads(row))
            except (ValueError, TypeError, KeyError):
                continue

    def _remember(self, step: int, loads: dict[int, list[float]]) -> None:
        for layer, shares in loads.items():
            history = self._loads.setdefault(layer, {})
            for later in [s for s in history if s >= step]:  # a resumed run logs these steps again
                del history[later]
            history[step] = shares

    def _heatmaps(self) -> dict[str, Any]:
        """One image per layer: load shares, experts x every remembered log step."""
        from PIL import Image  # matplotlib's own dependency

        out = {}
        for layer in sorted(self._loads):
            png = heatmap_png(*self.load_history(layer), f"layer {layer}: share of token-slots per expert")
            out[heatmap_key(layer)] = self._wandb.Image(Image.open(io.BytesIO(png)))
        return out

    def load_history(self, layer: int) -> tuple[list[int], np.ndarray]:
        """(steps, load_ES) the next heatmap of ``layer`` draws: shares, experts x remembered log steps."""
        history = self._loads.get(layer, {})
        return list(history), np.asarray(list(history.values()), dtype=np.float64).T

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        out: dict[str, Any] = {self.STEP: step}
        for key, value in metrics.items():
            if key == "step":
                continue
            if isinstance(value, list) and LOAD_LIST.match(key):
                if len(value) <= self._wandb.Histogram.MAX_LENGTH:
                    out[key] = self._wandb.Histogram(np_histogram=(value, list(range(len(value) + 1))))
            elif isinstance(value, list):
                out[key] = self._wandb.Histogram(value)
            else:
                out[key] = value
        out.update(per_expert_scalars(metrics))
        loads = per_expert_loads(metrics)
        if loads and self.heatmap_every:
            self._remember(step, loads)
            self._load_logs += 1
            if self._load_logs % self.heatmap_every == 0:
                out.update(self._heatmaps())
                self._drawn_at = step
        self._last_step = max(self._last_step, step)  # W&B drops a step below the last one
        self.run.log(out, step=step)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (``run.alert``, level WARN); offline runs keep it in the run files until synced.
        An alert that cannot be sent costs a warning line, never the run."""
        try:
            self.run.alert(title=title, text=text, level=self._wandb.AlertLevel.WARN)
        except Exception as err:  # noqa: BLE001 - W&B's service may be unreachable; the console line already said it
            log.warning(f"moeforge: W&B alert not sent ({type(err).__name__}: {err})")

    def rewind(self, step: int) -> None:
        """After a rollback to ``step``: W&B keeps what it has and drops steps at or below its last one,
        so the repeated steps appear in metrics.jsonl only (the rollback row says so)."""

    def close(self) -> None:
        """Draw the final heatmap (merged into the last logged step) unless it was drawn there, and finish."""
        if self.heatmap_every and self._loads and self._drawn_at != self._last_step:
            self.run.log({self.STEP: self._last_step, **self._heatmaps()}, step=self._last_step)
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
