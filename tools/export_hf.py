"""Export a moeforge DCP checkpoint as a Hugging Face model folder (config.json + model.safetensors).

    .venv/bin/python -m tools.export_hf runs/local/checkpoints/step_00000300 --arch mixtral --out hf/mixtral
    .venv/bin/python -m tools.export_hf <checkpoint> --arch qwen3_moe --out hf/q3 --config runs/x/.hydra/config.yaml --dtype bfloat16

``--arch`` is mixtral (MixtralForCausalLM), qwen3_moe (Qwen3MoeForCausalLM), olmoe (OlmoeForCausalLM)
or qwen2_moe (Qwen2MoeForCausalLM). The model, router and experts config come from the run's
``.hydra/config.yaml`` (by default the one beside the checkpoint folder), and must match the
checkpoint's manifest. What the architecture cannot hold (another router, shared experts, q/k norms
it lacks, dropping capacity, ...) is refused with the setting named (tools/hf_arch.py); nothing is
exported approximately. The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained``.
Exit status: 0 written; 2 refused (one line on stderr saying why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.hf_arch import EXPORT_ARCHS, arch_named, hf_config
from tools.hf_checkpoint import DTYPES, cli_status, load_moeforge_model, model_configs, need_hf, run_config_of, write_hf_folder
from tools.hf_mapping import describe, to_hf


def export(checkpoint: Path, arch_name: str, out: Path, config: Path | None = None, dtype: str = "float32") -> Path:
    """Write ``out`` (config.json, model.safetensors) from moeforge ``checkpoint``; returns ``out``."""
    arch = arch_named(arch_name, moe=True)
    need_hf()
    model_cfg, router_cfg, experts_cfg = model_configs(config or run_config_of(checkpoint))
    kwargs = hf_config(arch, model_cfg, router_cfg, experts_cfg)  # refuses before any tensor is read
    model = load_moeforge_model(checkpoint, model_cfg, router_cfg, experts_cfg)
    tensors = to_hf(model.state_dict(), model_cfg, arch)
    write_hf_folder(out, arch.hf_class, kwargs, tensors, dtype)
    print(f"moeforge: wrote {arch.hf_class} ({describe(tensors)}, {dtype}) to {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_hf", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a published moeforge checkpoint folder (step_N)")
    p.add_argument("--arch", required=True, choices=EXPORT_ARCHS)
    p.add_argument("--out", required=True, type=Path, help="the Hugging Face model folder to write")
    p.add_argument("--config", type=Path, help="the run's .hydra/config.yaml (default: <run>/.hydra/config.yaml beside checkpoints/)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = p.parse_args(argv)
    return cli_status(lambda: export(args.checkpoint, args.arch, args.out, args.config, args.dtype))


if __name__ == "__main__":
    sys.exit(main())
