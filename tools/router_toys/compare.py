"""Compare routers on toy tasks (CPU, minutes) or on the default byte-level language model.

    python -m tools.router_toys.compare --task regression --routers topk,dts,evomoe,comet+ --seeds 0,1
    python -m tools.router_toys.compare --task fluctuation --routers all --seeds 0,1 --out docs/cmp/fluct
    python -m tools.router_toys.compare --task lm --routers topk,dts,sigmoid_bias --seeds 0 --steps 150

Tasks (research/routers.md, the "Toy experiment (CPU)" paragraphs of §2, §4 and §6):

- ``regression``: clustered mixture of regressions, one MoE layer of 8 small SwiGLU experts
  (``tools/router_toys/tasks.py``); loss = MSE.
- ``fluctuation``: noisy sequences of one of 8 clusters, embedding + one transformer block
  (causal attention, MoE) + classifier; loss = cross-entropy. Attention-aware routers get the
  block's head-averaged attention probabilities.
- ``lm``: ``python -m launch.train`` subprocesses on the embedded byte corpus, plus a dense
  baseline with the same active parameters (``tools/router_toys/lm.py`` says why it is fair).

Routers are built by name through ``moe.routers.ROUTERS`` from their own ``Config`` dataclasses,
so every registered router works; a spec may set fields (``comet:gamma=0.5``), ``name+`` turns on
the permutation local search, ``evomoe`` is DTS with the expert-diversify phase, ``all`` is every
registered router (``tools/router_toys/specs.py``). A router that cannot run on a task (a missing
Config field, attention probabilities on the regression task, an error) gets a table row saying
why, and the others still run.

``--out DIR`` receives ``results.json`` (settings, configs, every curve), ``table.md`` and the PNGs
``loss_curves.png`` and ``expert_load.png``; column definitions are in
``tools/router_toys/train_toy.py`` and ``tools/router_toys/report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from moe.model import ModelConfig
from moe.routers import ROUTERS
from tools.router_toys import lm
from tools.router_toys.report import markdown_table, plot_eval_curves, plot_eval_deltas, plot_load_heatmaps, plot_loss_curves, write_results
from tools.router_toys.specs import SkipRouter, build_config, parse_router_list, parse_spec
from tools.router_toys.train_toy import RunResult, ToySettings, steps_to_target, train_one

DEFAULT_ROUTERS = "topk,dts,sigmoid_bias,expert_choice,comet,similarity"
DEFAULT_STEPS = {"regression": 500, "fluctuation": 300, "lm": 150}
DEFAULT_TARGET = {"regression": 0.3, "fluctuation": 0.25, "lm": 2.1}
LOSS_NAME = {"regression": "MSE", "fluctuation": "cross-entropy", "lm": "cross-entropy (nats/byte)"}
TASKS_WITH_ATTENTION = {"fluctuation", "lm"}
SUB_LABELS, DRIFT = 4, 0.05
"""Fluctuation defaults, chosen in docs/compare_routers/README.md ("The fluctuation task")."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.router_toys.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--task", choices=("regression", "fluctuation", "lm"), default="regression", help="which comparison to run")
    p.add_argument("--routers", default=DEFAULT_ROUTERS,
                   help=f"comma-separated router specs, or 'all' (registered: {', '.join(sorted(ROUTERS))})")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (data and init)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--target", type=float, default=None, help=f"loss target for 'steps to target' (default {DEFAULT_TARGET})")
    p.add_argument("--k", type=int, default=2,
                   help="experts per token, set on each Config's k (or capacity_factor); 0 keeps each router's default")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/compare_routers/<task>)")
    toy = p.add_argument_group("toy tasks")
    toy.add_argument("--num-experts", type=int, default=8)
    toy.add_argument("--d-ff", type=int, default=16, help="hidden width of each expert")
    toy.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    toy.add_argument("--batch-tokens", type=int, default=256, help="tokens per training step")
    toy.add_argument("--eval-every", type=int, default=10, help="steps between probe evaluations (flips, loads)")
    toy.add_argument("--task-seed", type=int, default=None,
                     help="fix the task instance (clusters, maps) and the probe across seeds; default: each seed draws its own")
    toy.add_argument("--probe-tokens", type=int, default=1024, help="held-out probe tokens (evaluation loss, flips, NMI)")
    toy.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny tensors: 1 is fastest)")
    fl = p.add_argument_group("fluctuation task (tools/router_toys/tasks.py)")
    fl.add_argument("--noise", type=float, default=3.0, help="std of each token's noise around its cluster mean")
    fl.add_argument("--sub-labels", type=int, default=SUB_LABELS,
                    help="labels per cluster, by a cluster-specific rule on the token (1 = the label is the cluster)")
    fl.add_argument("--drift", type=float, default=DRIFT, help="per-batch random-walk std of the cluster means (0 = fixed)")
    lmg = p.add_argument_group("lm task")
    lmg.add_argument("--no-dense", action="store_true", help="skip the dense baseline with equal active parameters")
    lmg.add_argument("--lm-backend", default="torch", help="experts.backend of the runs (torch | grouped_mm | ...)")
    lmg.add_argument("--lm-override", action="append", default=[], metavar="KEY=VALUE",
                     help="extra Hydra override for every run, e.g. train.batch_size=8 (repeatable)")
    lmg.add_argument("--lm-timeout", type=float, default=1800.0, help="seconds before one launch.train run is abandoned")
    lmg.add_argument("--lm-threads", type=int, default=1, help="train.threads of each run")
    lmg.add_argument("--lm-nproc", type=int, default=1,
                     help="data-parallel ranks per run (>1: python -m launch.torchrun --standalone with parallel=ddp)")
    lmg.add_argument("--jobs", type=int, default=1, help="launch.train runs at once (each uses --lm-threads threads)")
    p.add_argument("--render-only", action="store_true",
                   help="no training: rewrite table.md and the plots from --out's results.json (same --task); "
                        "with --target, the steps to that target are recounted from the stored curves")
    args = p.parse_args(argv)
    args.target_given = args.target is not None
    args.steps = DEFAULT_STEPS[args.task] if args.steps is None else args.steps
    args.target = DEFAULT_TARGET[args.task] if args.target is None else args.target
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds ({args.seeds!r}) must be comma-separated integers")
    args.out = args.out or Path("runs/compare_routers") / args.task
    if args.steps < 1 or not args.seed_list or args.k < 0 or args.eval_every < 1:
        p.error("--steps and --eval-every must be >= 1, --k >= 0, and --seeds must name at least one seed")
    return args


def fluctuation_options(args: argparse.Namespace) -> dict[str, Any]:
    """Constructor options of the fluctuation task from the command line."""
    return {"noise": args.noise, "sub_labels": args.sub_labels, "drift": args.drift}


def lm_tokens_per_step(args: argparse.Namespace) -> int:
    """Training tokens per optimizer step of the LM runs (``train.batch_size`` x ``train.seq_len``, overrides applied).

    ``train.batch_size`` is the whole step's batch (``train.grad_accum`` splits it into micro-batches).
    """
    from launch.config import TrainConfig

    d = TrainConfig()
    get = lambda key, default: int(lm.override_value(args.lm_override, key) or default)  # noqa: E731
    return get("train.batch_size", d.batch_size) * get("train.seq_len", d.seq_len)


def log(msg: str) -> None:
    print(f"compare_routers: {msg}", file=sys.stderr, flush=True)


def run_toy(args: argparse.Namespace) -> tuple[dict[str, list[RunResult]], dict[str, str], dict[str, Any]]:
    """Train every router spec for every seed on a toy task; (runs by label, notes, configs)."""
    settings = ToySettings(task=args.task, steps=args.steps, target=args.target, batch_tokens=args.batch_tokens,
                           eval_every=args.eval_every, lr=args.lr, num_experts=args.num_experts, d_ff=args.d_ff,
                           task_options=fluctuation_options(args) if args.task == "fluctuation" else {},
                           task_seed=args.task_seed, probe_tokens=args.probe_tokens)
    runs: dict[str, list[RunResult]] = {}
    notes: dict[str, str] = {}
    configs: dict[str, Any] = {}
    for text in parse_router_list(args.routers):
        runs[text] = []  # keeps the command-line order in the table, skipped ones included
        try:
            spec = parse_spec(text)
            if getattr(ROUTERS[spec.name], "needs_attention", False) and args.task not in TASKS_WITH_ATTENTION:
                raise SkipRouter(f"router {text!r} needs attention probabilities; the {args.task} task has no attention layer")
            cfg = build_config(spec, args.k or None, args.steps)
        except SkipRouter as err:
            notes[text] = f"skipped: {err}"
            log(notes[text])
            continue
        configs[text] = dataclasses.asdict(cfg)
        for seed in args.seed_list:
            try:
                result = train_one(text, cfg, seed, settings)
            except Exception as err:  # one broken router must not stop the comparison
                notes[text] = f"failed (seed {seed}): {type(err).__name__}: {err}"
                log(notes[text])
                runs[text] = []
                break
            runs[text].append(result)
            log(f"{args.task} {text} seed {seed}: final {result.final_loss:.4f}, NMI {result.nmi:.3f}, {result.wall_s:.1f}s")
    return runs, notes, configs


def run_lm(args: argparse.Namespace) -> tuple[dict[str, list[RunResult]], dict[str, str], dict[str, Any]]:
    """One ``launch.train`` run per router arm (and the dense baseline) and seed."""
    arms: list[lm.LmArm] = []
    notes: dict[str, str] = {}
    runs: dict[str, list[RunResult]] = {}
    for text in parse_router_list(args.routers):
        runs[text] = []
        try:
            arms.append(lm.router_arm(parse_spec(text), args.k or None, args.steps))
        except SkipRouter as err:
            notes[text] = f"skipped: {err}"
            log(notes[text])
    if not args.no_dense:
        k = args.k or ROUTERS["topk"].Config().k  # --k 0: match the default top-k router
        d_ff = int(lm.override_value(args.lm_override, "model.d_ff") or ModelConfig().d_ff)
        arms.append(lm.dense_arm(k, d_ff))
    runs_dir = args.out / "lm_runs"

    def one(arm: lm.LmArm, seed: int) -> RunResult:
        log(f"lm {arm.label} seed {seed}: {' '.join(arm.overrides)}")
        extra = lm.overrides_for(arm, args.lm_override)
        result = lm.run_arm(arm, seed, args.steps, args.target, runs_dir, extra, args.lm_backend, args.lm_timeout, args.lm_threads,
                            args.lm_nproc)
        log(f"lm {arm.label} seed {seed}: val_loss {result.final_loss:.4f}, {result.wall_s:.0f}s")
        return result

    # Seed-major order, so with --jobs 2 the arms of one seed finish close together.
    work = [(arm, seed) for seed in args.seed_list for arm in arms]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(arm.label, seed): pool.submit(one, arm, seed) for arm, seed in work}
    for arm in arms:
        runs[arm.label] = []
        for seed in args.seed_list:
            try:
                runs[arm.label].append(futures[(arm.label, seed)].result())
            except Exception as err:
                notes[arm.label] = f"failed (seed {seed}): {type(err).__name__}: {err}"
                log(notes[arm.label])
                runs[arm.label] = []
                break
    return runs, notes, {arm.label: list(arm.overrides) for arm in arms}


def table_footer(args: argparse.Namespace, wall: float) -> str:
    """What the columns mean for this task (definitions in tools/router_toys/train_toy.py and lm.py)."""
    loss = LOSS_NAME[args.task]
    reach = (f"Steps to target: first step whose trailing 10-step mean training loss <= {args.target:g} "
             "(mean over the seeds that reached it; reached/seeds).")
    if args.task == "lm":
        return (f"Final loss: validation {loss} at the last evaluation. {reach} NMI: none (no true clusters). "
                "Flip rate: launch.train's routing/layer*/flips (argmax of the router distribution on the validation "
                "probe batch), mean over layers and over the evaluations of the last half. Experts/token: "
                f"routing/layer*/experts_per_token_mean, mean over layers. Wall time {wall:.0f} s on this machine.")
    return (f"Final loss: held-out probe {loss} at the end. {reach} NMI: top-1 expert vs true cluster on the probe. "
            "Flip rate: share of probe tokens whose top-1 expert changed between consecutive evaluations "
            f"(every {args.eval_every} steps), last half of training. Wall time {wall:.0f} s on this machine.")


def load_results(path: Path) -> tuple[dict[str, list[RunResult]], dict[str, str], dict[str, Any]]:
    """Runs, notes and meta from a ``results.json`` (None floats back to NaN)."""
    payload = json.loads(path.read_text())
    floats = {f.name for f in dataclasses.fields(RunResult) if f.type in ("float", float)}
    def run(d: dict[str, Any]) -> RunResult:
        return RunResult(**{k: (math.nan if v is None and k in floats else v) for k, v in d.items()})
    return {label: [run(d) for d in runs] for label, runs in payload["routers"].items()}, payload["notes"], payload["meta"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.render_only:  # tables and plots again from an earlier run's results.json (no training)
        runs, notes, loaded_meta = load_results(args.out / "results.json")
        meta = loaded_meta
        wall, configs = float(meta["wall_s"]), meta["configs"]
        args.steps, args.seed_list, args.k = meta["steps"], meta["seeds"], meta["k"]
        if args.target_given:  # a new target: recount the steps to reach it from the stored curves
            for result in (r for rs in runs.values() for r in rs):
                result.steps_to_target = steps_to_target(result.losses, args.target, min(10, max(1, len(result.losses))))
        else:
            args.target = meta["target"]
        args.eval_every = meta.get("eval_every", args.eval_every)
        args.lm_override = [o for i, o in enumerate(meta["argv"]) if i > 0 and meta["argv"][i - 1] == "--lm-override"]
    else:
        runs, notes, configs = run_lm(args) if args.task == "lm" else run_toy(args)
        wall = time.perf_counter() - t0
    meta = {"task": args.task, "steps": args.steps, "target": args.target, "k": args.k, "seeds": args.seed_list,
            "argv": sys.argv[1:] if argv is None else argv, "configs": configs, "wall_s": wall}
    if args.task != "lm":
        meta.update(num_experts=args.num_experts, d_ff=args.d_ff, lr=args.lr, batch_tokens=args.batch_tokens, eval_every=args.eval_every,
                    task_seed=args.task_seed, probe_tokens=args.probe_tokens)
    if args.task == "fluctuation":
        meta.update(fluctuation_options(args))
    if args.render_only:
        meta = {**loaded_meta, "target": args.target}  # the run's own settings and command line
    write_results(args.out, meta, runs, notes)
    title = f"Router comparison: {args.task} ({len(args.seed_list)} seed(s), {args.steps} steps, k={args.k or 'router default'})"
    reference = lm.DENSE_LABEL if args.task == "lm" else None
    (args.out / "table.md").write_text(markdown_table(title, runs, notes, table_footer(args, wall), reference))
    plot_loss_curves(args.out / "loss_curves.png", runs, LOSS_NAME[args.task], args.target)
    plot_eval_curves(args.out / "val_curves.png", runs, LOSS_NAME[args.task], lm_tokens_per_step(args) if args.task == "lm" else None)
    if reference is not None:
        plot_eval_deltas(args.out / "val_delta.png", runs, reference, LOSS_NAME[args.task], lm_tokens_per_step(args))
    plot_load_heatmaps(args.out / "expert_load.png", runs)
    log(f"wrote {args.out}/table.md, results.json, loss_curves.png, val_curves.png, expert_load.png in {wall:.0f}s")
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
