"""The ``parallel`` config group: which layout the job uses and the FSSDP knobs.

``parallel=<mode>`` selects ``conf/parallel/<mode>.yaml``; every field here can be overridden as
``parallel.<field>=...`` (``parallel.fssdp.<knob>=...`` for the nested FSSDP knobs). Rules that
need the world size or the number of experts are checked by ``check_layout`` at start-up, before
any model is built or any token is routed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe.errors import check

MODES = ("none", "ddp", "fsdp", "ep", "fssdp")
DENSE = ("ddp", "fsdp")


@dataclass(kw_only=True)
class FSSDPConfig:
    """Knobs of fully sharded sparse data parallelism (Hecate, Qing et al. 2025, §4)."""

    overlap_degree: int = 2
    """t: experts per layer whose gather hides under the preceding attention (Algorithm 1)."""
    memory_cap: int = 2
    """m: extra (non-owned) experts per layer a rank may materialise (Algorithm 1)."""
    window: int = 5
    """w: routing counts are a sliding-window mean over the last w steps (§4.2)."""
    reshard_every: int = 100
    """Re-plan expert ownership (Algorithm 2) every N optimizer steps; 0 never (§4.3, §5.1)."""
    rematerialize: bool = False
    """Hecate-RM: free gathered replicas after forward and gather them again for backward."""
    prefetch: bool = True
    """Start each layer's spAG before its block's attention (async) so the two overlap (§4.2)."""
    debug_plan_hash: bool = False
    """All-gather a hash of every plan and fail if two ranks differ (costs one collective)."""
    shard_size: int = 0
    """Ranks one FSSDP group spans; 0 = the whole world. Below the world size, groups of this many
    consecutive ranks each shard every expert once and the groups are replicas (their owners
    all-reduce expert gradients), like FSDP's hybrid sharding: spAG, spRS and the token
    all-to-all stay inside a group (a node, with shard_size = GPUs per node)."""

    def __post_init__(self) -> None:
        check(self.overlap_degree >= 0, "parallel.fssdp.overlap_degree", self.overlap_degree, "must be >= 0")
        check(self.memory_cap >= 0, "parallel.fssdp.memory_cap", self.memory_cap, "must be >= 0")
        check(self.window >= 1, "parallel.fssdp.window", self.window, "must be >= 1")
        check(self.reshard_every >= 0, "parallel.fssdp.reshard_every", self.reshard_every, "must be >= 0 (0 disables)")
        check(self.shard_size >= 0, "parallel.fssdp.shard_size", self.shard_size, "must be >= 0 (0 = world size)")


@dataclass(kw_only=True)
class ParallelConfig:
    mode: str = "none"
    """none | ddp | fsdp | ep | fssdp."""
    ep_size: int = 0
    """Expert-parallel group size for mode=ep; 0 means the whole world."""
    dense: str = "ddp"
    """How non-expert parameters are data-parallel in ep/fssdp: ddp (replicated) | fsdp (FSDP2 sharded)."""
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)
    timeout_s: int = 600
    """Process-group timeout: a collective that waits longer fails instead of hanging."""
    heartbeat_s: float = 60.0
    """A rank whose heartbeat (through the rendezvous store) stops for this long is named as failed
    and the run stops (exit status 3 on the other ranks); 0 disables (parallel/heartbeat.py)."""
    bucket_mb: float = 25.0
    """Gradient all-reduce bucket size for dense=ddp."""
    overlap_grad_reduce: bool = True
    """dense=ddp: start each bucket's all-reduce during backward, as soon as its gradients are ready (DDP); false = after backward."""

    def __post_init__(self) -> None:
        if isinstance(self.fssdp, dict):  # plain construction from a dict (tests, scripts)
            self.fssdp = FSSDPConfig(**self.fssdp)
        check(self.mode in MODES, "parallel.mode", self.mode, f"must be one of {list(MODES)}")
        check(self.dense in DENSE, "parallel.dense", self.dense, f"must be one of {list(DENSE)}")
        check(self.ep_size >= 0, "parallel.ep_size", self.ep_size, "must be >= 0 (0 = world size)")
        check(self.ep_size <= 1 or self.mode == "ep", "parallel.ep_size", self.ep_size, f"is only used by parallel.mode=ep (mode is {self.mode!r})")
        shard = self.fssdp.shard_size
        check(shard == 0 or self.mode == "fssdp", "parallel.fssdp.shard_size", shard, f"is only used by parallel.mode=fssdp (mode is {self.mode!r})")
        check(self.timeout_s >= 1, "parallel.timeout_s", self.timeout_s, "must be >= 1")
        check(self.heartbeat_s >= 0, "parallel.heartbeat_s", self.heartbeat_s, "must be >= 0 (0 disables)")
        check(self.bucket_mb > 0, "parallel.bucket_mb", self.bucket_mb, "must be > 0")


def resolved_ep_size(cfg: ParallelConfig, world_size: int) -> int:
    """The expert-parallel group size: ``ep_size`` or the whole world when 0."""
    return cfg.ep_size if cfg.ep_size > 0 else world_size


def expert_shard_size(cfg: ParallelConfig, world_size: int) -> int:
    """Ranks among which every expert is held once: the EP group (ep) or the FSSDP group (fssdp);
    the world for the other modes. ``world_size // expert_shard_size`` groups are replicas."""
    if cfg.mode == "ep":
        return resolved_ep_size(cfg, world_size)
    if cfg.mode == "fssdp" and cfg.fssdp.shard_size > 0:
        return cfg.fssdp.shard_size
    return world_size


def check_world(cfg: ParallelConfig, world_size: int) -> None:
    """Rules that need the world size (called by ``setup_runtime`` before anything is built)."""
    if cfg.mode in ("ep", "fssdp"):
        size = expert_shard_size(cfg, world_size)
        key = "parallel.ep_size" if cfg.mode == "ep" else "parallel.fssdp.shard_size"
        check(size <= world_size, key, size, f"must be <= the world size ({world_size})")
        check(world_size % size == 0, key, size, f"must divide the world size ({world_size})")


def check_experts(cfg: ParallelConfig, world_size: int, num_experts: int) -> None:
    """Rules that need the model's expert count (called by ``apply_parallel`` on the built model)."""
    if cfg.mode == "ep":
        ep = resolved_ep_size(cfg, world_size)
        check(num_experts % ep == 0, "parallel.ep_size", ep, f"must divide model.num_experts ({num_experts})")
