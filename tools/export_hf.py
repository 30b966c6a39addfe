"""Export a moeforge checkpoint as a Hugging Face model folder (config.json + model.safetensors).

    .venv/bin/python -m tools.export_hf runs/local/checkpoints/step_00000300 --arch mixtral --out hf/mixtral
    .venv/bin/python -m tools.export_hf runs/local --arch qwen3_moe --out hf/q3 --dtype bfloat16 --overwrite

The first argument is a checkpoint ``step_N`` or a folder holding checkpoints (a run directory, an
import's ``--out``: its newest checkpoint that verifies; launch/pretrained.py). ``--arch`` is mixtral
(MixtralForCausalLM), qwen3_moe (Qwen3MoeForCausalLM), olmoe (OlmoeForCausalLM) or qwen2_moe
(Qwen2MoeForCausalLM). The model, router and experts config come from the ``config.yaml`` the
checkpoint carries (``--config`` names another composed config, e.g. a run's ``.hydra/config.yaml``),
and must match the checkpoint's manifest. What the architecture cannot hold (another router, shared
experts, q/k norms it lacks, dropping capacity, ...) is refused with the setting named
(tools/hf/arch.py); nothing is exported approximately.

``--out`` must be empty or absent: a folder with files in it is refused unless ``--overwrite``, which
replaces it by exactly the new files (the folder is written beside it and swapped in, so a stale
shard or index can never survive). The folder loads with
``transformers.AutoModelForCausalLM.from_pretrained``. Exit status: 0 written; 2 refused (one line
on stderr saying why).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from pathlib import Path

from launch.pretrained import find_checkpoint
from tools.cli import DTYPES, cli_status, parse_with_overrides
from tools.hf.arch import EXPORT_ARCHS, ConversionError, arch_named, hf_config
from tools.hf.checkpoint import load_moeforge_model, model_configs_of, need_hf, write_hf_folder
from tools.hf.mapping import describe, to_hf


def refuse_nonempty(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a folder with files in it unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConversionError(f"--out {out} is not empty ({listed}); choose an empty folder, or pass --overwrite to replace "
                              f"its contents with exactly the exported files")


def export(checkpoint: Path, arch_name: str, out: Path, config: Path | None = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``out`` (config.json, model.safetensors) from the moeforge ``checkpoint``; returns ``out``."""
    arch = arch_named(arch_name, moe=True)
    need_hf()
    refuse_nonempty(out, overwrite)
    checkpoint = find_checkpoint(checkpoint)
    model_cfg, router_cfg, experts_cfg = model_configs_of(checkpoint, config)
    kwargs = hf_config(arch, model_cfg, router_cfg, experts_cfg)  # refuses before any tensor is read
    model = load_moeforge_model(checkpoint, model_cfg, router_cfg, experts_cfg)
    tensors = to_hf(model.state_dict(), model_cfg, arch)
    out = out.absolute()
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_hf_folder(tmp, arch.hf_class, kwargs, tensors, dtype)
        if out.exists():
            old = out.with_name(f"{out.name}.del-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"moeforge: wrote {arch.hf_class} ({describe(tensors)}, {dtype}) from {checkpoint} to {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_hf", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a moeforge checkpoint (step_N), or a run directory / import folder holding checkpoints")
    p.add_argument("--arch", required=True, choices=EXPORT_ARCHS)
    p.add_argument("--out", required=True, type=Path, help="the Hugging Face model folder to write (empty or absent)")
    p.add_argument("--config", type=Path, help="a composed run config (default: the config.yaml the checkpoint carries)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out by exactly the exported files")
    args, overrides = parse_with_overrides(p, argv)
    if overrides:
        p.error(f"export_hf takes no Hydra overrides (got {' '.join(overrides)}); the checkpoint's config is used")
    return cli_status(lambda: export(args.checkpoint, args.arch, args.out, args.config, args.dtype, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
