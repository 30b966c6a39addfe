"""``parallel.fssdp.*``: the knobs of fully sharded sparse data parallelism (``parallel=fssdp``).

Its own module: ``parallel.fssdp`` reads these knobs and ``parallel.config`` nests them in its schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.errors import check


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
