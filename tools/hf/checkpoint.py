"""Reading and writing the two checkpoint formats the HF tools convert between.

- A Hugging Face model directory: ``config.json`` plus ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``). Only safetensors are read: ``pytorch_model.bin`` is a pickle
  and is refused, as moeforge never unpickles a checkpoint (launch/dcp_io.py).
- A moeforge DCP checkpoint (launch/checkpoint.py, format 2). Reading verifies its SHA-256 manifest
  and loads the model part only. Writing composes the trainer's own Hydra config from the import's
  overrides, builds the model and AdamW exactly as ``python -m launch.train`` does, and saves step 0
  through ``launch.checkpoint.save_checkpoint`` with ``launch.job.manifest_of``, so the trainer
  resumes from it (checkpoint.resume=auto) at any world size and parallel mode: the DCP state names
  every expert by its global index (parallel/checkpoint.py).

transformers and safetensors are the optional ``hf`` extra: ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import RouterConfig
from tools.cli import DTYPES
from tools.hf.arch import ConversionError



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


def model_configs_of(checkpoint: Path, config_yaml: Path | None = None) -> tuple[ModelConfig, Any, ExpertsConfig]:
    """(model, router, experts) configs for ``checkpoint``: from ``config_yaml`` when given, else the
    config the checkpoint carries (launch/pretrained.py)."""
    from launch.pretrained import checkpoint_config, model_configs

    if config_yaml is None:
        return model_configs(checkpoint_config(checkpoint), f"the config of {checkpoint}")
    if not config_yaml.is_file():
        raise ConversionError(f"{config_yaml} does not exist; pass --config with the run's .hydra/config.yaml")
    cfg = OmegaConf.load(config_yaml)
    assert isinstance(cfg, DictConfig)
    return model_configs(cfg, str(config_yaml))


def load_moeforge_model(checkpoint: Path, model: ModelConfig, router: RouterConfig, experts: ExpertsConfig) -> MoETransformer:
    """The model of a verified moeforge checkpoint (``launch.pretrained.load_model``)."""
    from launch.pretrained import load_model

    return load_model(checkpoint, model, router, experts)


def compose_job(overrides: list[str]) -> Any:
    """The trainer's validated ``JobConfig`` for ``python -m launch.train <overrides>``."""
    return compose_run(overrides)[0]


def compose_run(overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """(validated ``JobConfig``, composed config resolved to plain values) of ``launch.train <overrides>``.

    ``hydra.*`` overrides are for the trainer's own run and are left out here.
    """
    from hydra import compose, initialize_config_dir

    from launch.config import conf_dir
    from launch.job import register_schemas, to_job_config
    from launch.run_dir import register_resolvers

    register_resolvers()  # what the trainer registers before Hydra composes conf/train.yaml
    register_schemas()

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
    except Exception as err:  # Hydra's own errors name the override
        raise ConversionError(f"the trainer config does not compose from these overrides: {err}") from None
    job = to_job_config(cfg)
    return job, OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@torch.no_grad()
def write_moeforge_checkpoint(state_dict: dict[str, Tensor], overrides: list[str]) -> Path:
    """Save ``state_dict`` as step 0 of the run ``python -m launch.train <overrides>`` would be.

    The optimizer is the trainer's AdamW with empty moments (``step`` 0), so continuing from it is
    the same as starting that run with these weights.
    """
    from launch.checkpoint import save_checkpoint
    from launch.optim import build_optimizer
    from launch.engines.native import training_state
    from launch.job import manifest_of
    from parallel import Runtime

    job, run_config = compose_run(overrides)
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
    return save_checkpoint(job.checkpoint.dir, 0, state, manifest_of(job), runtime, keep=1, run_config=run_config)


def launch_command(overrides: list[str]) -> str:
    """The command that continues training from the written checkpoint; it runs from any directory
    (this Python by its absolute path; every path the import wrote is absolute)."""
    return " ".join([shlex.quote(sys.executable), "-m", "launch.train", *(shlex.quote(o) for o in overrides)])


def refuse_used_out(out: Path) -> None:
    """Refuse an ``--out`` that already holds checkpoints, before anything is read or written: training
    from it would resume from those and prune the import."""
    from launch.checkpoint import published_checkpoints

    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a folder")
    folder = out / "checkpoints"
    found = [p.name for p in published_checkpoints(folder)] if folder.is_dir() else []
    if found or (folder.is_dir() and any(folder.iterdir())):
        what = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "") if found else "unfinished files"
        raise ConversionError(f"--out {out} already holds checkpoints ({folder}: {what}); training from it would resume from "
                              f"those, not from this import. Choose a new --out, or move {folder} away (nothing was written)")


def publish_import(state_dict: dict[str, Tensor], trainer_overrides: list[str], out: Path, what: str, note: str = "") -> Path:
    """Write ``state_dict`` as a step-0 checkpoint for ``trainer_overrides``, keep the overrides in
    ``out/overrides.txt``, and print (stderr) ``what`` was written, ``note``, and the command that continues."""
    refuse_used_out(out)
    path = write_moeforge_checkpoint(state_dict, trainer_overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overrides.txt").write_text("\n".join(trainer_overrides) + "\n")
    lines = [f"moeforge: {what} at {path}", *([f"moeforge: {note}"] if note else []),
             f"moeforge: continue training with:\n  {launch_command(trainer_overrides)}"]
    print("\n".join(lines), file=sys.stderr)
    return path


def import_overrides(out: Path, model_name: str) -> list[str]:
    """The overrides that give an import's continued run its own run directory (``out``) and checkpoints."""
    root = out.resolve()
    return [f"model.name={model_name}", f"hydra.run.dir={root}", f"checkpoint.dir={root / 'checkpoints'}"]
