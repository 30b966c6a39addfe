"""Import a Hugging Face MoE model folder as a moeforge checkpoint that ``launch.train`` continues from.

    .venv/bin/python -m tools.import_hf hf/mixtral --out runs/mixtral_cpt
    .venv/bin/python -m tools.import_hf hf/olmoe --out runs/olmoe_cpt data=memmap data.path=tokens/ train.seq_len=2048

The folder's ``config.json`` picks the architecture (mixtral, qwen3_moe, olmoe, qwen2_moe); weights
are read from safetensors only. It writes ``<out>/checkpoints/step_00000000`` (fp32 weights, the
trainer's AdamW with empty moments, and the run config as ``config.yaml``) and ``<out>/overrides.txt``:
the Hydra overrides that rebuild this model and router (every model-shaping key), make ``<out>`` the
continued run's own run directory (``hydra.run.dir``, ``checkpoint.dir``), then the overrides given on
the command line (anywhere: tools/cli.py). It prints the command that continues training, which runs
from any directory; add ``parallel=...`` or run it under ``launch.torchrun`` at any world size: the
checkpoint is layout-independent. An ``--out`` that already holds checkpoints is refused before
anything is read or written (training would resume from those instead).

The router's losses are the architecture's own: ``router.aux_loss_coef`` is config.json's
``router_aux_loss_coef`` and ``router.z_loss_coef`` is 0 (none of these architectures has a router
z-loss; moeforge's default is 0.001); both are stated when the import is written, and any override
changes them. A setting moeforge cannot compute exactly (biases, RoPE scaling, sliding
windows, q/k/v clipping, ...) is refused, naming it. Exit status: 0 written; 2 refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe.model import ModelConfig
from tools.cli import cli_status, parse_with_overrides
from tools.hf.arch import arch_of_model_type, moeforge_config, overrides
from tools.hf.checkpoint import import_overrides, publish_import, read_hf_config, read_hf_tensors, refuse_used_out
from tools.hf.mapping import describe, from_hf


def import_hf(src: Path, out: Path, extra: list[str] | None = None) -> tuple[Path, list[str]]:
    """Convert the HF folder ``src`` into a checkpoint under ``out``; returns (checkpoint, trainer overrides)."""
    refuse_used_out(out)
    config = read_hf_config(src)
    arch = arch_of_model_type(config.model_type, moe=True)
    model_kw, router_kw = moeforge_config(config, arch)
    args = [*overrides(model_kw, router_kw), *import_overrides(out, f"imported_{arch.name}"), *(extra or [])]
    state = from_hf(read_hf_tensors(src), ModelConfig(**model_kw), arch)
    note = (f"router losses as in {arch.hf_class}: router.aux_loss_coef={router_kw['aux_loss_coef']} (config.json "
            f"router_aux_loss_coef), router.z_loss_coef=0 (it has no router z-loss); override either to change it")
    return publish_import(state, args, out, f"imported {arch.hf_class} ({describe(state)})", note), args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.import_hf", description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, type=Path, help="folder for checkpoints/ and overrides.txt")
    p.epilog = "Hydra overrides for the continued run (data=..., train.steps=...) may stand anywhere on the line."
    args, extra = parse_with_overrides(p, argv)
    return cli_status(lambda: import_hf(args.src, args.out, extra))


if __name__ == "__main__":
    sys.exit(main())
