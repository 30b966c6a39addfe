"""Reading and writing the two checkpoint formats the HF tools convert between.

- A Hugging Face model directory: ``config.json`` plus ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``). Only safetensors are read: ``pytorch_model.bin`` is a pickle
  and is refused, as moeforge never unpickles a checkpoint (launch/dcp_io.py).
- A moeforge DCP checkpoint (launch/checkpoint.py, format 2). Reading verifies its SHA-256 manifest
  and loads the model part only. Writing composes the trainer's own Hydra config from the import's
  overrides, builds the model and AdamW exactly as ``python -m launch.train`` does, and saves step 0
  through ``launch.checkpoint.save_checkpoint`` with ``launch.train.manifest_of``, so the trainer
  resumes from it (checkpoint.resume=auto) at any world size and parallel mode: the DCP state names
  every expert by its global index (parallel/checkpoint.py).

transformers and safetensors are the optional ``hf`` extra: ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from moe.errors import CheckpointError, MoeforgeError
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import router_class
from tools.hf_arch import ConversionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def need_hf() -> Any:
    """The ``transformers`` module, or a ConversionError saying how to install the extra."""
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError as err:
        raise ConversionError(f"the Hugging Face tools need transformers and safetensors ({err}); "
                              f"install them with: pip install -e \".[hf]\"") from None
    return transformers


# ----------------------------------------------------------------------------- Hugging Face folders


def read_hf_config(path: Path) -> Any:
    """The transformers config of the model folder ``path`` (local files only)."""
    transformers = need_hf()
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json (expected a Hugging Face model folder)")
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def read_hf_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor in the folder's safetensors file(s), as saved (dtype unchanged)."""
    need_hf()
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise ConversionError(f"{path} holds pytorch_model.bin (a pickle); moeforge reads safetensors only. Convert it with "
                              f"transformers' save_pretrained(..., safe_serialization=True) first")
    else:
        raise ConversionError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def write_hf_folder(path: Path, hf_class: str, config_kwargs: dict[str, Any], tensors: dict[str, Tensor], dtype: str) -> None:
    """``config.json`` (transformers' own config class for ``hf_class``) and ``model.safetensors``."""
    transformers = need_hf()
    from safetensors.torch import save_file

    model_cls = getattr(transformers, hf_class)
    config = model_cls.config_class(**config_kwargs)
    config.architectures = [hf_class]
    config.dtype = dtype
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    cast = {name: t.to(DTYPES[dtype]).contiguous() for name, t in tensors.items()}
    save_file(cast, str(path / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- moeforge checkpoints


def run_config_of(checkpoint: Path) -> Path:
    """The ``.hydra/config.yaml`` of the run that wrote ``checkpoint`` (``<run>/checkpoints/step_N``)."""
    return checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"


def model_configs(config_yaml: Path) -> tuple[ModelConfig, Any, ExpertsConfig]:
    """(model, router, experts) configs of a run's composed config, validated by their schemas.

    Only these three groups are read: they are all a checkpoint's tensors and function depend on
    (the others hold interpolations that only resolve inside a Hydra run).
    """
    if not config_yaml.is_file():
        raise ConversionError(f"{config_yaml} does not exist; pass --config with the run's .hydra/config.yaml")
    cfg = OmegaConf.load(config_yaml)
    assert isinstance(cfg, DictConfig)

    def build(schema: type, key: str) -> Any:
        node = cfg.get(key)
        if node is None:
            raise ConversionError(f"{config_yaml} has no '{key}' group")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))

    router_name = cfg.get("router", {}).get("name", "topk")
    return build(ModelConfig, "model"), build(router_class(router_name).Config, "router"), build(ExpertsConfig, "experts")


@torch.no_grad()
def load_moeforge_model(checkpoint: Path, model: ModelConfig, router: Any, experts: ExpertsConfig) -> MoETransformer:
    """The model of a verified moeforge checkpoint (the optimizer state is not read)."""
    from launch.checkpoint import check_compatible, load_checkpoint, verify_checkpoint
    from launch.train import manifest_of
    from parallel import Runtime, checkpoint_state

    runtime = Runtime()
    found = verify_checkpoint(checkpoint, runtime)
    if found:
        raise CheckpointError(f"checkpoint {checkpoint} does not verify: {found[0]}")
    check_compatible(checkpoint, manifest_of(SimpleNamespace(model=model, router=router)))  # type: ignore[arg-type]
    net = MoETransformer(model, router, experts)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)  # checkpoint_state names experts; no optimizer state read
    view = checkpoint_state(net, dummy)["model"]
    state: dict[str, Any] = {"model": dict(view)}
    rng = torch.get_rng_state()
    load_checkpoint(checkpoint, state, runtime)
    torch.set_rng_state(rng)
    for name, tensor in state["model"].items():
        if tensor is not view[name]:
            view[name].copy_(tensor)
    return net.eval()


def compose_job(overrides: list[str]) -> Any:
    """The trainer's validated ``JobConfig`` for ``python -m launch.train <overrides>``."""
    from hydra import compose, initialize_config_dir

    import launch.train  # noqa: F401  (registers the config schemas and resolvers, as the trainer does)
    from launch.config import conf_dir, to_job_config

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except Exception as err:  # Hydra's own errors name the override
        raise ConversionError(f"the trainer config does not compose from these overrides: {err}") from None
    return to_job_config(cfg)


@torch.no_grad()
def write_moeforge_checkpoint(state_dict: dict[str, Tensor], overrides: list[str]) -> Path:
    """Save ``state_dict`` as step 0 of the run ``python -m launch.train <overrides>`` would be.

    The optimizer is the trainer's AdamW with empty moments (``step`` 0), so continuing from it is
    the same as starting that run with these weights.
    """
    from launch.checkpoint import save_checkpoint
    from launch.optim import build_optimizer
    from launch.engines.native import training_state
    from launch.train import manifest_of
    from parallel import Runtime

    job = compose_job(overrides)
    model = MoETransformer(job.model, job.router, job.experts)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ConversionError(f"converted weights do not fit the moeforge model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    optimizer, scheduler = build_optimizer(model, job)
    runtime = Runtime()
    state = training_state(model, optimizer, scheduler, runtime, {"step": 0})
    for per_param in optimizer.state.values():  # checkpoint_state ran a zero-lr step to create the moments
        if "step" in per_param:
            per_param["step"].zero_()
    return save_checkpoint(job.checkpoint.dir, 0, state, manifest_of(job), runtime, keep=1)


def launch_command(overrides: list[str]) -> str:
    """The command that continues training from the written checkpoint."""
    return " ".join([".venv/bin/python -m launch.train", *(shlex.quote(o) for o in overrides)])


def publish_import(state_dict: dict[str, Tensor], trainer_overrides: list[str], out: Path, what: str) -> Path:
    """Write ``state_dict`` as a step-0 checkpoint for ``trainer_overrides``, keep the overrides in
    ``out/overrides.txt``, and print (stderr) ``what`` was written and the command that continues."""
    path = write_moeforge_checkpoint(state_dict, trainer_overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overrides.txt").write_text("\n".join(trainer_overrides) + "\n")
    print(f"moeforge: {what} at {path}\nmoeforge: continue training with:\n  {launch_command(trainer_overrides)}", file=sys.stderr)
    return path


def cli_status(action: Callable[[], object]) -> int:
    """Run a tool's ``action``: exit status 0, or 2 with one ``moeforge: error:`` line for a MoeforgeError."""
    try:
        action()
    except MoeforgeError as err:
        print(f"moeforge: error: {err}", file=sys.stderr)
        return 2
    return 0
