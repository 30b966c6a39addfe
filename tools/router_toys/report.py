"""Outputs of a comparison: ``results.json``, ``table.md`` and the PNG plots (matplotlib, Agg).

Table columns (one row per router spec, values over seeds): final loss ``mean ± std`` (sample std,
0 for one seed), steps to target (mean over the seeds that reached it, and how many did), NMI and
flip rate (means; ``—`` where the task has no clusters or no late evaluation pair), experts per
token as ``training mean / final`` (means), and for classification (the fluctuation task) the final
probe accuracy (mean). A router that could not run gets one row saying why.

With a reference row (``reference``: the LM task's dense baseline) two last columns compare each
row with it. Unpaired: ``Δ = mean - mean_ref`` and ``z = Δ / sqrt(s²/n + s_ref²/n_ref)`` (Welch).
Paired by seed: runs with the same seed share the data order and the validation batches, so much
of the spread over seeds is common to both arms; ``d_i = loss_i - loss_ref,i`` over the seeds both
have, reported as ``mean(d) ± std(d)`` and ``t = mean(d) / (std(d) / sqrt(n))``. |z| or |t| > 2:
the difference is beyond 2 standard errors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tools.router_toys.train_toy import RunResult

HEADER = "| router | final loss (mean±std) | steps to target | NMI | flip rate | experts/token (train / final) |"
ACCURACY_HEADER = " accuracy |"


def _finite(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values: list[float | None], fmt: str = "{:.3f}") -> str:
    vals = _finite(values)
    return fmt.format(float(np.mean(vals))) if vals else "—"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def table_row(label: str, runs: list[RunResult]) -> str:
    """One markdown row summarising ``runs`` (all seeds of one router spec); classification adds accuracy."""
    finals = _finite([r.final_loss for r in runs])
    loss = "—"
    if finals:
        m, s = mean_std(finals)
        loss = f"{m:.4f} ± {s:.4f}"
    reached = [r.steps_to_target for r in runs if r.steps_to_target is not None]
    target = f"{np.mean(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"— (0/{len(runs)})"
    ept = f"{_mean([r.experts_per_token_train for r in runs], '{:.2f}')} / {_mean([r.experts_per_token_final for r in runs], '{:.2f}')}"
    row = f"| {label} | {loss} | {target} | {_mean([r.nmi for r in runs])} | {_mean([r.flip_rate for r in runs])} | {ept} |"
    accuracies = _finite([r.final_accuracy for r in runs])
    return row + (f" {np.mean(accuracies):.3f} |" if accuracies else "")


def difference(runs: list[RunResult], ref: list[RunResult]) -> tuple[float, float]:
    """``(Δ, z)``: difference of mean final losses from ``ref`` and Δ over its standard error (module docstring)."""
    a, b = _finite([r.final_loss for r in runs]), _finite([r.final_loss for r in ref])
    if not a or not b:
        return math.nan, math.nan
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return ma - mb, (ma - mb) / se if se > 0 else math.nan


def paired_difference(runs: list[RunResult], ref: list[RunResult]) -> tuple[float, float, float]:
    """``(mean d, std d, t)`` of per-seed differences ``d_i = final_i - final_ref,i`` (module docstring)."""
    ref_by_seed = {r.seed: r.final_loss for r in ref}
    d = [r.final_loss - ref_by_seed[r.seed] for r in runs if r.seed in ref_by_seed]
    d = _finite(d)
    if len(d) < 2:
        return (d[0] if d else math.nan), math.nan, math.nan
    m, s = mean_std(d)
    return m, s, m / (s / math.sqrt(len(d))) if s > 0 else math.nan


def markdown_table(
    title: str, runs_by_label: dict[str, list[RunResult]], notes: dict[str, str], footer: str = "", reference: str | None = None
) -> str:
    """The whole ``table.md``: title, header, one row per router (runs, or a skip/failure note)."""
    with_accuracy = any(r.final_accuracy is not None for runs in runs_by_label.values() for r in runs)
    header, rule = (HEADER + ACCURACY_HEADER, "|---" * 7 + "|") if with_accuracy else (HEADER, "|---" * 6 + "|")
    ref_runs = runs_by_label.get(reference or "", [])
    if ref_runs:
        header, rule = header + f" Δ vs {reference} (z) | Δ paired by seed (t) |", rule + "---|---|"
    lines = [f"# {title}", "", header, rule]
    for label in dict.fromkeys([*runs_by_label, *notes]):  # command-line order
        runs = runs_by_label.get(label, [])
        if runs:
            row = table_row(label, runs)
            if ref_runs:
                d, z = difference(runs, ref_runs)
                pm, ps, t = paired_difference(runs, ref_runs)
                row += " — | — |" if label == reference else f" {d:+.4f} ({z:+.1f}) | {pm:+.4f} ± {ps:.4f} ({t:+.1f}) |"
            lines.append(row)
        else:
            note = notes.get(label, "no runs")
            lines.append(f"| {label} | {note.replace('|', '/')} | | | | |")
    if footer:
        lines += ["", footer]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict[str, Any], runs_by_label: dict[str, list[RunResult]], notes: dict[str, str]) -> None:
    """``results.json``: the settings, every run's curves and summary, and the skip/failure notes."""
    payload = {
        "meta": meta,
        "routers": {label: [asdict(r) for r in runs] for label, runs in runs_by_label.items()},
        "notes": notes,
    }
    (out / "results.json").write_text(json.dumps(_finite_json(payload), separators=(",", ":"), allow_nan=False))


def _finite_json(value: Any) -> Any:
    """``value`` with floats rounded to 6 significant digits and NaN/inf as None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _smooth(values: list[float], window: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size < window or window <= 1:
        return arr
    return np.convolve(arr, np.ones(window) / window, mode="valid")


def plot_loss_curves(path: Path, runs_by_label: dict[str, list[RunResult]], ylabel: str, target: float | None, window: int = 10) -> None:
    """Training loss (moving average over ``window`` steps, mean over seeds) per router, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=80)
    for label, runs in runs_by_label.items():
        curves = [_smooth(r.losses, window) for r in runs if r.losses]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(np.arange(n) + min(window, len(runs[0].losses)), mean, label=label, lw=1.2)
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=0.8, label=f"target {target:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training {ylabel} (moving avg {window})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_eval_curves(path: Path, runs_by_label: dict[str, list[RunResult]], ylabel: str, tokens_per_step: int | None = None) -> None:
    """Evaluation loss vs training tokens (or steps): mean over seeds, band of ±1 sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=80)
    for label, runs in runs_by_label.items():
        curves = [r.eval_losses for r in runs if r.eval_losses]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        dense = "dense" in label
        _mean_band(ax, runs, np.asarray([c[:n] for c in curves], dtype=np.float64), tokens_per_step, label=label,
                   lw=2.0 if dense else 1.2, ls="--" if dense else "-", color="k" if dense else None)
    _finish(fig, ax, path, tokens_per_step, f"validation {ylabel}")


def plot_eval_deltas(path: Path, runs_by_label: dict[str, list[RunResult]], reference: str, ylabel: str, tokens_per_step: int | None = None) -> None:
    """Evaluation loss minus the reference's, paired by seed, vs training tokens: mean and ±1 std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = {r.seed: r for r in runs_by_label.get(reference, [])}
    if not ref:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=80)
    for label, runs in runs_by_label.items():
        pairs = [(r.eval_losses, ref[r.seed].eval_losses) for r in runs if r.seed in ref and label != reference]
        if not pairs:
            continue
        n = min(min(len(a), len(b)) for a, b in pairs)
        d = np.asarray([np.asarray(a[:n]) - np.asarray(b[:n]) for a, b in pairs], dtype=np.float64)
        _mean_band(ax, runs, d, tokens_per_step, label=label, lw=1.2, marker="o", ms=3)
    ax.axhline(0.0, color="k", ls="--", lw=1.0, label=reference)
    _finish(fig, ax, path, tokens_per_step, f"validation {ylabel} minus {reference}\n(paired by seed; below 0 = better)")


def _mean_band(ax: Any, runs: list[RunResult], values_SN: np.ndarray, tokens_per_step: int | None, **line: Any) -> None:
    """Plot the mean over seeds (rows) of ``values_SN`` against the first run's evaluation steps (in
    tokens when ``tokens_per_step`` is given), with a band of ±1 sample std (none for one seed)."""
    n = values_SN.shape[1]
    x = np.asarray(runs[0].eval_steps[:n], dtype=np.float64) * (tokens_per_step or 1)
    mean = values_SN.mean(axis=0)
    std = values_SN.std(axis=0, ddof=1) if len(values_SN) > 1 else np.zeros(n)
    (drawn,) = ax.plot(x, mean, **line)
    ax.fill_between(x, mean - std, mean + std, color=drawn.get_color(), alpha=0.15, lw=0)


def _finish(fig: Any, ax: Any, path: Path, tokens_per_step: int | None, ylabel: str) -> None:
    """Label the axes of an evaluation plot, add legend and grid, save it to ``path`` and close it."""
    ax.set_xlabel("training tokens" if tokens_per_step else "step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_load_heatmaps(path: Path, runs_by_label: dict[str, list[RunResult]]) -> None:
    """Share of routed slots per expert (rows) over training windows (columns), first seed of each router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(label, runs[0]) for label, runs in runs_by_label.items() if runs and runs[0].load_fractions]
    if not items:
        return
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), dpi=80, squeeze=False, layout="constrained")
    image = None
    loads = [np.asarray(run.load_fractions, dtype=np.float64).T for _, run in items]  # [E, windows] each
    # One scale for all panels, saturating at the 98th percentile so one extreme phase (EvoMoE's
    # single base expert takes 100%) does not wash out every other panel.
    vmax = max(2.0 / loads[0].shape[0], float(np.percentile(np.concatenate([x.ravel() for x in loads]), 98)))
    for ax, (label, run), load_EW in zip(axes.flat, items, loads):
        steps = run.eval_steps or list(range(1, load_EW.shape[1] + 1))
        image = ax.imshow(load_EW, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
                          extent=(0, steps[-1], -0.5, load_EW.shape[0] - 0.5), interpolation="nearest")
        ax.set_title(f"{label} (seed {run.seed})", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, extend="max", label="share of routed slots")
    fig.savefig(path)
    plt.close(fig)
