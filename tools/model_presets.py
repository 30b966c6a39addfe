"""The model presets of ``conf/model/`` with their parameter counts: the README's presets table.

    .venv/bin/python -m tools.model_presets            # markdown table on stdout

Each preset is composed exactly as ``python -m launch.train model=<name>`` would compose it
(default router and experts, plus whatever the preset sets, e.g. ``router.k``), built on the
``meta`` device (no memory, so a 47B-parameter preset counts in a second) and counted by
``launch.throughput.count_model``: total parameters, and active ones, those a token's forward
multiplies with (the input embedding left out; see launch/throughput.py for the rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from launch.config import conf_dir
from launch.job import register_schemas, to_job_config
from launch.throughput import count_model
from moe.model import MoETransformer

FLOPS_SEQ_LEN = 2048
"""Sequence length of the table's FLOPs column (training FLOPs per token, launch/throughput.py)."""


@dataclass(frozen=True)
class Preset:
    name: str
    layers: int
    d_model: int
    heads: str
    experts: str
    total: int
    active: int
    gflops_per_token: float


def preset_names() -> list[str]:
    """Every ``conf/model/*.yaml``, tiny (the default) first, then by name."""
    names = sorted(p.stem for p in (Path(conf_dir()) / "model").glob("*.yaml"))
    return sorted(names, key=lambda n: (n != "tiny", n))


def describe(name: str) -> Preset:
    """Compose ``model=<name>`` and count the model it builds."""
    register_schemas()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        job = to_job_config(compose("train", overrides=[f"model={name}", "logging=none", "checkpoint.dir=unused"]))
    m = job.model
    with torch.device("meta"):
        model = MoETransformer(m, job.router, job.experts)
    counts = count_model(model, FLOPS_SEQ_LEN)
    heads = f"{m.num_heads}" if m.kv_heads == m.num_heads else f"{m.num_heads} (kv {m.kv_heads})"
    k = job.router.experts_per_token
    experts = f"{m.num_experts} x {m.d_ff}, top-{k}" + (f" + {m.num_shared_experts} shared" if m.num_shared_experts else "")
    return Preset(name, m.num_layers, m.d_model, heads, experts, counts.total_params, counts.active_params,
                  counts.flops_per_token / 1e9)


def _millions(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def table() -> str:
    """The README's presets table (markdown)."""
    rows = [
        f"| preset | layers | d_model | heads | experts x width, k | total params | active params | GFLOP per token (S={FLOPS_SEQ_LEN}) |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for name in preset_names():
        p = describe(name)
        rows.append(f"| `{p.name}` | {p.layers} | {p.d_model} | {p.heads} | {p.experts} | {_millions(p.total)} | "
                    f"{_millions(p.active)} | {p.gflops_per_token:,.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
