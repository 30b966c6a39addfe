"""The job: every config schema registered with Hydra, a composed config made a validated ``JobConfig``,
and the manifest its checkpoints record.

``python -m launch.train`` and the tools that compose or check a job as the trainer does
(tools/hf/checkpoint.py, tools/bench/step_budget.py, tools/model_presets.py) import this module, not the
trainer. It sits above the schemas (launch/config.py, the component configs) and the engine
registry (launch/engines/), which none of them import back: each engine owns its config schema
(``Config``) and its rules across groups (``check_job``), both reached here through the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from launch.config import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
    validate_job,
)
from launch.engines import ENGINES, check_job as check_engine_job, engine_class
from moe.errors import ConfigError
from moe.experts import ExpertsConfig
from moe.model import ModelConfig
from moe.routers import ROUTERS, router_class
from parallel import ParallelConfig
from parallel.modes import check_config as check_parallel

GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "experts": ExpertsConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig,
}
"""Groups with one schema, stored as ``schema/<group>``; router and engine schemas are one per choice."""

GROUPS = ("model", "router", "experts", "data", "optim", "train", "logging", "checkpoint", "parallel", "engine")


def register_schemas() -> None:
    """Store every group schema as ``schema/<group>``, every router's as ``schema/router/<name>`` and every
    engine's as ``schema/engine/<name>`` (what ``conf/<group>/*.yaml`` start from)."""
    cs = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=schema)
    for name, router_cls in ROUTERS.items():
        cs.store(group="schema/router", name=name, node=router_cls.Config)
    for name in ENGINES:
        cs.store(group="schema/engine", name=name, node=engine_class(name).Config)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Instantiate every group's dataclass (running its checks), then the rules across groups: the
    runtime's (``validate_job``) and the chosen engine's (``check_job``)."""
    groups = {}
    for group in GROUPS:
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"config group '{group}' is missing from the composed config")
        groups[group] = _instantiate(group, node)
    job = JobConfig(**groups)
    validate_job(job)
    check_engine_job(job)
    return job


def _instantiate(group: str, node: DictConfig) -> Any:
    if group == "router":
        router_class(node.get("name"))  # an unknown name fails here, naming router.name
    try:
        value = OmegaConf.to_object(node)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf wraps errors raised by __post_init__
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"{group}: {err}") from None
    if group == "parallel":
        check_parallel(value)  # the mode's rules: a known parallel.mode, parallel.dense, its group-size key
    return value


def manifest_of(job: JobConfig) -> dict[str, Any]:
    """The config that shapes tensors in a checkpoint; a resume must match it (``optim.moments_dtype``: the
    dtype of the saved moments; a checkpoint from before the key has fp32 ones, ``launch.checkpoint.SINCE``)."""
    model = dataclasses.asdict(job.model)
    model.pop("name", None)
    return {"model": model, "router": {"name": job.router.name}, "optim": {"moments_dtype": job.optim.moments_dtype}}
