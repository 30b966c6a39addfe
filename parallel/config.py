"""The ``parallel`` config group: which layout the job uses and the FSSDP knobs.

``parallel=<mode>`` selects ``conf/parallel/<mode>.yaml``; every field here can be overridden as
``parallel.<field>=...`` (``parallel.fssdp.<knob>=...`` for the nested FSSDP knobs). Rules that
need the world size or the number of experts are checked by ``check_world`` and ``check_experts``
at start-up, before any model is built or any token is routed; each rule is asked of the mode's
object in ``parallel.modes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe.errors import check
from parallel.fssdp_config import FSSDPConfig
from parallel.modes import MODES, ParallelMode, names_where


@dataclass(kw_only=True)
class ParallelConfig:
    """``parallel.*``: the mode, its group sizes, the dense placement and the process-group knobs."""

    mode: str = "none"
    """A mode registered in ``parallel.modes`` (none | ddp | fsdp | ep | fssdp); ``layout`` is its object."""
    ep_size: int = 0
    """Expert-parallel group size for mode=ep; 0 means the whole world."""
    dense: str = "ddp"
    """How non-expert parameters are data-parallel in a mode that splits experts (ep, fssdp): a mode that
    places dense parameters, ddp (replicated) | fsdp (FSDP2 sharded); ``dense_layout`` is its object."""
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
        dense = names_where(lambda m: m.places_dense)
        check(self.dense in dense, "parallel.dense", self.dense, f"must be one of {dense}")
        check(self.ep_size >= 0, "parallel.ep_size", self.ep_size, "must be >= 0 (0 = world size)")
        self._check_used("parallel.ep_size", self.ep_size, self.ep_size > 1)
        self._check_used("parallel.fssdp.shard_size", self.fssdp.shard_size, self.fssdp.shard_size != 0)
        check(self.timeout_s >= 1, "parallel.timeout_s", self.timeout_s, "must be >= 1")
        check(self.heartbeat_s >= 0, "parallel.heartbeat_s", self.heartbeat_s, "must be >= 0 (0 disables)")
        check(self.bucket_mb > 0, "parallel.bucket_mb", self.bucket_mb, "must be > 0")

    def _check_used(self, key: str, value: int, is_set: bool) -> None:
        """Refuse a set group-size ``key`` under a mode that does not read it, naming the mode that does."""
        users = names_where(lambda m: m.group_size_key == key)
        check(not is_set or self.layout.group_size_key == key, key, value,
              f"is only used by parallel.mode={'|'.join(users)} (mode is {self.mode!r})")

    @property
    def layout(self) -> ParallelMode:
        """The registered object of ``mode``: what the runtime, the trainer and the engines ask about the layout."""
        return MODES[self.mode]

    @property
    def dense_layout(self) -> ParallelMode:
        """The registered object of ``dense``: how a mode that splits experts places the other parameters."""
        return MODES[self.dense]


def check_world(cfg: ParallelConfig, world_size: int) -> None:
    """Rules that need the world size (called by ``setup_runtime`` before anything is built)."""
    cfg.layout.check_world(cfg, world_size)


def check_experts(cfg: ParallelConfig, world_size: int, num_experts: int) -> None:
    """Rules that need the model's expert count (called by ``apply_parallel`` on the built model)."""
    cfg.layout.check_experts(cfg, world_size, num_experts)
