"""Parallel-mode registry: ``parallel.mode`` name -> mode object (each one file in this folder).

``parallel=<name>`` on the command line selects ``conf/parallel/<name>.yaml``, whose ``mode``
field picks the object here (``parallel_mode``). Everything outside this package asks the object
(``distributed``, ``splits_experts``, ``wrap`` ...) instead of comparing names, and the rules of a
``ParallelConfig`` that depend on its mode are checked here. Adding a mode: one file with a
``ParallelMode`` subclass, one line below, one YAML.
"""

from __future__ import annotations

from collections.abc import Callable

from moe.errors import check
from parallel.config import ParallelConfig
from moe.registry import load_classes
from parallel.modes.base import ParallelMode, SplitExperts

MODES: dict[str, ParallelMode] = {name: cls() for name, cls in load_classes({
    "none": "parallel.modes.none:SingleProcess",
    "ddp": "parallel.modes.ddp:DataParallel",
    "fsdp": "parallel.modes.fsdp:FullySharded",
    "ep": "parallel.modes.ep:ExpertParallel",
    "fssdp": "parallel.modes.fssdp:FullyShardedSparse",
}, ParallelMode, "parallel mode").items()}
"""Registry name -> mode object, each class given as ``"module:Class"`` (one line per mode)."""
for _name, _mode in MODES.items():
    if _mode.name != _name:
        raise TypeError(f"parallel mode {_name!r} is registered under a name its class does not carry ({_mode.name!r})")


def names_where(fact: Callable[[ParallelMode], bool]) -> list[str]:
    """The names of the registered modes for which ``fact`` holds, in registry order (for messages and checks)."""
    return [name for name, mode in MODES.items() if fact(mode)]


def parallel_mode(name: str) -> ParallelMode:
    """The mode registered as ``name``; a ConfigError naming parallel.mode otherwise."""
    check(name in MODES, "parallel.mode", name, f"must be one of {list(MODES)}")
    return MODES[name]


def check_config(cfg: ParallelConfig) -> ParallelMode:
    """``cfg``'s mode after the rules that depend on it: a known name, ``parallel.dense`` naming a mode
    that places dense parameters, and each group-size key set only under the mode that reads it."""
    mode = parallel_mode(cfg.mode)
    dense = names_where(lambda m: m.places_dense)
    check(cfg.dense in dense, "parallel.dense", cfg.dense, f"must be one of {dense}")
    for key, value, is_set in (("parallel.ep_size", cfg.ep_size, cfg.ep_size > 1),
                               ("parallel.fssdp.shard_size", cfg.fssdp.shard_size, cfg.fssdp.shard_size != 0)):
        users = names_where(lambda m: m.group_size_key == key)
        check(not is_set or mode.group_size_key == key, key, value, f"is only used by parallel.mode={'|'.join(users)} (mode is {cfg.mode!r})")
    return mode


def check_world(cfg: ParallelConfig, world_size: int) -> None:
    """Rules that need the world size (checked by ``setup_runtime`` before anything is built)."""
    check_config(cfg).check_world(cfg, world_size)


def check_experts(cfg: ParallelConfig, world_size: int, num_experts: int) -> None:
    """Rules that need the model's expert count (checked by ``apply_parallel`` and the trainer)."""
    check_config(cfg).check_experts(cfg, world_size, num_experts)


__all__ = ["MODES", "ParallelMode", "SplitExperts", "check_config", "check_experts", "check_world", "names_where", "parallel_mode"]
