"""Sparse upcycling: a dense Hugging Face Llama/Mistral/Qwen2/Qwen3 model becomes a moeforge MoE checkpoint.

    .venv/bin/python -m tools.upcycle_hf hf/llama --out runs/upcycled --num-experts 8 --k 2
    .venv/bin/python -m tools.upcycle_hf hf/qwen3 --out runs/up --num-experts 16 --k 2 --moe-every 2 --noise 0.01 data=memmap data.path=tokens/

Sparse Upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints", ICLR 2023, arXiv:2212.05055): every weight of the dense model is kept; each upcycled FFN becomes an MoE
layer whose experts all start as copies of that FFN, and the router is new and randomly
initialised. Here its weights are drawn from N(0, std^2) with std the dense config's
``initializer_range`` (how that model family initialises a new linear layer; ``--router-std``
changes it). ``--moe-every 2`` upcycles every other FFN and keeps the rest dense. ``--noise s`` adds
independent Gaussian noise of s times each weight matrix's own standard deviation to every expert
copy, to break the experts' symmetry (0: exact copies).

With exact copies and ``router.renormalize=always`` (the default here), the top-k weights sum to 1
over identical experts, so the upcycled model computes the dense model's function at step 0 (the
tests check the logits). Like ``tools.import_hf`` it writes ``<out>/checkpoints/step_00000000`` (with
its ``config.yaml``) and ``<out>/overrides.txt`` (``<out>`` is the continued run's run directory),
refuses an ``--out`` that already holds checkpoints, takes Hydra overrides anywhere on the line, and
prints the command that continues training. A dense model has no router losses of its own, so the
new router trains with moeforge's defaults (``router.aux_loss_coef=0.01``, ``router.z_loss_coef=0.001``),
as the tool says.
Exit status: 0 written; 2 refused (one line on stderr naming the setting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe.errors import MoeforgeError
from moe.model import ModelConfig
from moe.routers.topk import RENORMALIZE, TopKConfig
from tools.cli import cli_status, parse_with_overrides
from tools.hf.arch import arch_of_model_type, dense_base_config, overrides
from tools.hf.checkpoint import compose_job, import_overrides, publish_import, read_hf_config, read_hf_tensors, refuse_used_out
from tools.hf.mapping import HFTensors, backbone_from_hf, dense_from_hf, describe, is_moe_layer


def upcycle_state(tensors: dict[str, Tensor], cfg: ModelConfig, arch: Any, router_std: float, noise: float,
                  generator: torch.Generator) -> dict[str, Tensor]:
    """The moeforge state dict of the upcycled model (see the module docstring)."""
    t = HFTensors(tensors, arch)
    sd = backbone_from_hf(t, cfg)
    D, F, E = cfg.d_model, cfg.d_ff, cfg.num_experts
    for i in range(cfg.num_layers):
        b = f"blocks.{i}.ffn."
        dense = dense_from_hf(t, f"model.layers.{i}.mlp.", b, D, F)
        if not is_moe_layer(cfg, i):
            sd.update(dense)
            continue
        sd[b + "router.gate.weight"] = torch.randn(E, D, generator=generator) * router_std
        for src, dst in (("w_gate_DF", "w_gate_EDF"), ("w_up_DF", "w_up_EDF"), ("w_down_FD", "w_down_EFD")):
            w = dense[b + src]
            copies = w.unsqueeze(0).repeat(E, 1, 1)
            if noise > 0:
                copies += torch.randn(copies.shape, generator=generator) * (noise * float(w.std()))
            sd[b + "experts." + dst] = copies
    t.finish()
    return sd


def upcycle(src: Path, out: Path, num_experts: int, k: int, moe_every: int = 1, noise: float = 0.0, router_std: float | None = None,
            renormalize: str = "always", seed: int = 0, extra: list[str] | None = None) -> tuple[Path, list[str]]:
    """Upcycle the dense HF folder ``src`` into a checkpoint under ``out``; returns (checkpoint, trainer overrides)."""
    refuse_used_out(out)
    config = read_hf_config(src)
    arch = arch_of_model_type(config.model_type, moe=False)
    model_kw = {**dense_base_config(config, arch), "num_experts": num_experts, "moe_every": moe_every}
    router_kw = {"k": k, "renormalize": renormalize}
    cfg = ModelConfig(**model_kw)  # bad values fail here, naming the model key
    TopKConfig(**router_kw)
    if k > num_experts:
        raise MoeforgeError(f"--k ({k}) must be <= --num-experts ({num_experts})")
    std = float(router_std if router_std is not None else getattr(config, "initializer_range", 0.02))
    args = [*overrides(model_kw, router_kw), *import_overrides(out, f"upcycled_{arch.name}"), *(extra or [])]
    state = upcycle_state(read_hf_tensors(src), cfg, arch, std, noise, torch.Generator().manual_seed(seed))
    job = compose_job(args)
    note = (f"router losses: moeforge's router.aux_loss_coef={job.router.aux_loss_coef}, router.z_loss_coef={job.router.z_loss_coef} "
            f"(a dense model has none of its own); override either to change it")
    what = f"upcycled {arch.hf_class} into {num_experts} experts top-{k} ({describe(state)})"
    return publish_import(state, args, out, what, note), args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.upcycle_hf", description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="a dense Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, type=Path, help="folder for checkpoints/ and overrides.txt")
    p.add_argument("--num-experts", required=True, type=int)
    p.add_argument("--k", type=int, default=2, help="experts per token (router.k)")
    p.add_argument("--moe-every", type=int, default=1, help="upcycle the FFN of every n-th layer (model.moe_every)")
    p.add_argument("--noise", type=float, default=0.0, help="expert noise, in units of each weight's std (0: exact copies)")
    p.add_argument("--router-std", type=float, help="router init std (default: the dense config's initializer_range)")
    p.add_argument("--renormalize", default="always", choices=list(RENORMALIZE), help="router.renormalize")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and the noise")
    p.epilog = "Hydra overrides for the continued run (data=..., train.steps=...) may stand anywhere on the line."
    a, extra = parse_with_overrides(p, argv)
    return cli_status(lambda: upcycle(a.src, a.out, a.num_experts, a.k, a.moe_every, a.noise, a.router_std, a.renormalize, a.seed, extra))


if __name__ == "__main__":
    sys.exit(main())
