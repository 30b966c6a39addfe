"""Load a trained or imported moeforge model in Python: the one public call.

    from launch.pretrained import load_pretrained

    pre = load_pretrained("runs/local")                       # a run directory: its newest checkpoint that verifies
    pre = load_pretrained("runs/local/checkpoints/step_00000300", device="cuda", dtype=torch.bfloat16)
    pre = load_pretrained("runs/mixtral_cpt")                 # what tools.import_hf / tools.upcycle_hf wrote
    logits_BSV, _ = pre.model(tokens_BS)

``path`` is a checkpoint (``step_N``), a ``checkpoints/`` folder, or a folder holding one (a run
directory, an import's ``--out``, a sweep job's directory). The model is rebuilt from the config the
checkpoint carries (``config.yaml``, launch/checkpoint.py; checkpoints written before that fall back to
the run's ``.hydra/config.yaml``), checked against the manifest, loaded after the checkpoint's
SHA-256 manifest verifies, and returned in eval mode. Experts are stored under their global index
(parallel/checkpoint.py), so a checkpoint trained under ``parallel=ep`` or ``fssdp`` on any number of
ranks loads into this one-process model unchanged. Only the model is read, never the optimizer.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe.errors import CheckpointError
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import RouterConfig, router_class

RUN_CONFIG = Path(".hydra") / "config.yaml"


@dataclass
class Pretrained:
    """A loaded model with what shaped it."""

    model: MoETransformer
    """In eval mode, on the asked device and dtype."""
    config: DictConfig
    """The composed config of the run that wrote the checkpoint (every group: ``config.data``, ...)."""
    checkpoint: Path
    step: int


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names (see the module docstring); ``CheckpointError`` saying what was found instead."""
    from launch.checkpoint import MANIFEST, select_checkpoint
    from parallel import Runtime

    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} does not exist (expected a checkpoint step_N, a checkpoints/ folder, or a run directory)")
    for folder in (p / "checkpoints", p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = select_checkpoint(folder, Runtime())
        if found is not None:
            return found
    raise CheckpointError(f"{p} holds no published checkpoint (neither {p / 'checkpoints'} nor {p} has a step_N folder with {MANIFEST})")


def checkpoint_config(checkpoint: Path) -> DictConfig:
    """The run config a checkpoint carries (``config.yaml``), else its run's ``.hydra/config.yaml``."""
    from launch.checkpoint import CONFIG

    for candidate in (checkpoint / CONFIG, checkpoint.resolve().parent.parent / RUN_CONFIG):
        if candidate.is_file():
            cfg = OmegaConf.load(candidate)
            assert isinstance(cfg, DictConfig)
            return cfg
    raise CheckpointError(f"{checkpoint} carries no {CONFIG} and {checkpoint.resolve().parent.parent / RUN_CONFIG} does not exist; "
                          f"pass the run's .hydra/config.yaml explicitly (--config)")


def model_configs(cfg: DictConfig, source: str = "the config") -> tuple[ModelConfig, RouterConfig, ExpertsConfig]:
    """(model, router, experts) configs of a composed run config, each validated by its schema.

    Only these groups are read: a checkpoint's tensors and the function they compute depend on them
    alone (other groups may hold values that only resolve inside a Hydra run).
    """

    def build(schema: type, key: str) -> Any:
        node = cfg.get(key)
        if node is None:
            raise CheckpointError(f"{source} has no '{key}' group")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))

    router_name = (cfg.get("router") or {}).get("name", "topk")
    return build(ModelConfig, "model"), build(router_class(router_name).Config, "router"), build(ExpertsConfig, "experts")


@torch.no_grad()
def load_model(checkpoint: Path, model_cfg: ModelConfig, router_cfg: RouterConfig, experts_cfg: ExpertsConfig) -> MoETransformer:
    """The fp32 CPU model of a verified native checkpoint, built from these configs (optimizer state not read)."""
    from launch.checkpoint import check_compatible, load_checkpoint, read_manifest, verify_checkpoint
    from launch.engines import checkpoint_engine
    from launch.engines.native import NativeConfig
    from parallel import Runtime, checkpoint_state

    manifest = read_manifest(checkpoint)
    engine = checkpoint_engine(manifest)
    if engine != NativeConfig.name:
        raise CheckpointError(f"{checkpoint} was written by engine={engine}; load_pretrained reads native checkpoints "
                              f"(resume it under engine={engine} and save with engine=native to convert)")
    runtime = Runtime()
    found = verify_checkpoint(checkpoint, runtime)
    if found:
        raise CheckpointError(f"checkpoint {checkpoint} does not verify: {found[0]}")
    model_shape = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "name"}
    check_compatible(checkpoint, {"model": model_shape, "router": {"name": router_cfg.name}})
    net = MoETransformer(model_cfg, router_cfg, experts_cfg)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)  # checkpoint_state names experts; no optimizer state is read
    view = checkpoint_state(net, dummy)["model"]
    state: dict[str, Any] = {"model": dict(view)}
    rng = torch.get_rng_state()
    load_checkpoint(checkpoint, state, runtime)
    torch.set_rng_state(rng)  # loading restores the trainer's RNG; the caller's stays as it was
    for name, tensor in state["model"].items():
        if tensor is not view[name]:
            view[name].copy_(tensor)
    return net.eval()


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pretrained:
    """Load the moeforge checkpoint at ``path`` as a ready model (eval mode) on ``device`` in ``dtype``.

    ``path``: a checkpoint ``step_N``, a ``checkpoints/`` folder, a run directory or an import's
    ``--out`` (the newest checkpoint there that verifies). The logits in fp32 are those of the
    trainer's model at that checkpoint, bit for bit.
    """
    checkpoint = find_checkpoint(path)
    cfg = checkpoint_config(checkpoint)
    model_cfg, router_cfg, experts_cfg = model_configs(cfg, f"the config of {checkpoint}")
    net = load_model(checkpoint, model_cfg, router_cfg, experts_cfg)
    device = torch.device(device)
    net = net.to(device=device, dtype=dtype)
    net.prepare(device)
    from launch.checkpoint import step_of

    return Pretrained(model=net, config=cfg, checkpoint=checkpoint, step=step_of(checkpoint))
