"""Loss, perplexity and per-layer routing statistics of a moeforge checkpoint on a data config.

    .venv/bin/python -m tools.evaluate runs/local                                  # the run's own validation batches
    .venv/bin/python -m tools.evaluate runs/local --batches 32 --out eval.json
    .venv/bin/python -m tools.evaluate runs/mixtral_cpt data=memmap data.path=tokens/ --split training

The first argument is anything ``launch.pretrained.load_pretrained`` reads. The data are the run's
own ``data`` group unless ``data=...`` / ``data.*`` overrides (anywhere on the line) say otherwise;
the batches are the trainer's (``launch.data.BatchSampler`` with the run's ``train.seed``, split
``validation`` or ``training``), ``--batches`` of ``--batch-size`` x ``--seq-len`` tokens (defaults: the
run's ``train.eval_batches``, ``train.batch_size``, ``train.seq_len``), so with the defaults the loss
is the trainer's last ``val_loss`` for that checkpoint.

- loss: mean next-token cross-entropy in nats over every predicted token; perplexity = exp(loss);
- per MoE layer, the routing statistics of the trainer (moe/stats.py: tokens per expert, load
  coefficient of variation, max/min load, dead fraction, router entropy, experts per token, dropped
  fraction), from the decisions the routers make on these batches at evaluation.

Writes JSON (stdout, or ``--out``) and one summary line on stderr. Exit status 0, or 2 with one
``moeforge: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from launch.data import BatchSampler, memmap_corpus, stdlib_corpus
from launch.pretrained import load_pretrained
from moe.dispatch import dispatch
from moe.errors import ConfigError
from moe.model import MoETransformer
from moe.stats import RoutingStats
from tools.cli import DTYPES, cli_status, parse_with_overrides

SPLITS = {"training": 0, "validation": 1}
"""Split name -> the ``BatchSampler`` stream index the trainer uses for it (launch/train.py VAL_SPLIT)."""


def data_group(run_config: DictConfig, overrides: list[str]) -> Any:
    """The ``DataConfig`` to evaluate on: the run's, or the trainer's composition of ``data`` overrides."""
    from tools.hf.checkpoint import compose_job

    other = [o for o in overrides if not o.lstrip("+~").startswith("data")]
    if other:
        raise ConfigError(f"only data=... / data.* overrides apply here; got {' '.join(other)} (use --batch-size, --seq-len)")
    if not overrides:
        from launch.config import DataConfig

        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), run_config.data))
    vocab = int(run_config.model.vocab_size)
    return compose_job([*overrides, f"model.vocab_size={vocab}", "checkpoint.dir=unused"]).data


def token_splits(data: Any, vocab_size: int) -> Any:
    if data.name == "stdlib_bytes":
        return stdlib_corpus(data.val_fraction, data.max_bytes)
    return memmap_corpus(str(data.path), data.dtype, data.val_fraction, vocab_size)


class RoutingRecorder:
    """Per MoE layer, fold every evaluation decision into a fresh ``RoutingStats`` (forward hooks on the routers)."""

    def __init__(self, model: MoETransformer) -> None:
        self.stats: dict[int, RoutingStats] = {}
        self.handles = []
        for i, layer in model.moe_layers():
            stats = self.stats[i] = RoutingStats(layer.num_experts)

            def hook(module: Any, inputs: Any, decision: Any, stats: RoutingStats = stats, layer: Any = layer) -> None:
                stats.update(decision, dispatch(decision, layer.num_experts, layer.capacity_factor))

            self.handles.append(layer.router.register_forward_hook(hook))

    def summary(self) -> dict[str, dict[str, Any]]:
        for h in self.handles:
            h.remove()
        return {f"layer{i}": RoutingStats.summarize(*stats.raw()) for i, stats in self.stats.items()}


@torch.no_grad()
def evaluate(path: Path, overrides: list[str], batches: int | None = None, batch_size: int | None = None, seq_len: int | None = None,
             split: str = "validation", device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """The evaluation record (see the module docstring)."""
    from launch.train_step import doc_ids

    pre = load_pretrained(path, device, DTYPES[dtype])
    cfg = pre.config
    data = data_group(cfg, overrides)
    batches = int(batches or cfg.train.eval_batches)
    batch_size = int(batch_size or cfg.train.batch_size)
    seq_len = int(seq_len or cfg.train.seq_len)
    if seq_len > pre.model.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds model.max_seq_len ({pre.model.cfg.max_seq_len})")
    splits = token_splits(data, pre.model.cfg.vocab_size)
    tokens = splits.val if split == "validation" else splits.train
    sampler = BatchSampler(tokens, seq_len, batch_size, int(cfg.train.seed), 0, 1, SPLITS[split], split=split)
    recorder = RoutingRecorder(pre.model)
    device_t = pre.model.embed.weight.device
    total = torch.zeros(2, dtype=torch.float64, device=device_t)
    for index in range(batches):
        x, y = (t.to(device_t) for t in sampler.batch(index))
        ce_sum, _ = pre.model(x, doc_ids_BS=doc_ids(x, data.doc_separator), targets_BS=y, reduction="sum")  # as the trainer's evaluate
        total[0] += ce_sum.double()
        total[1] += y.numel()
    loss = float(total[0] / total[1])
    return {"checkpoint": str(pre.checkpoint), "step": pre.step, "split": split, "data": data.name, "batches": batches,
            "batch_size": batch_size, "seq_len": seq_len, "tokens": int(total[1]), "loss": loss, "perplexity": math.exp(loss),
            "routing": recorder.summary()}


def one_line(record: dict[str, Any]) -> str:
    """The summary line: loss, perplexity, and each MoE layer's load CV and entropy."""
    layers = " ".join(f"{name} cv {r['load_cv']:.3f} H {r['entropy']:.3f}" for name, r in record["routing"].items() if r)
    return (f"moeforge: step {record['step']} {record['split']} loss {record['loss']:.4f} perplexity {record['perplexity']:.3f} "
            f"over {record['tokens']:,} tokens ({record['data']}); routing: {layers}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="a checkpoint, run directory or import folder")
    p.add_argument("--batches", type=int, help="number of batches (default: the run's train.eval_batches)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's train.seq_len)")
    p.add_argument("--split", default="validation", choices=list(SPLITS))
    p.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    a, overrides = parse_with_overrides(p, argv)
    for name in ("batches", "batch_size", "seq_len"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {value})")

    def act() -> None:
        record = evaluate(a.path, overrides, a.batches, a.batch_size, a.seq_len, a.split, a.device, a.dtype)
        text = json.dumps(record, indent=1)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(text + "\n")
        else:
            print(text)
        print(one_line(record), file=sys.stderr)

    return cli_status(act)


if __name__ == "__main__":
    sys.exit(main())
