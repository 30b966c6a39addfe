"""The ``parallel`` config group: which layout the job uses and the FSSDP knobs.

``parallel=<mode>`` selects ``conf/parallel/<mode>.yaml``; every field here can be overridden as
``parallel.<field>=...`` (``parallel.fssdp.<knob>=...`` for the nested FSSDP knobs). This schema
checks what each field alone must satisfy; the rules that depend on the mode (a known name, the
dense placement, which group-size key it reads, the world size, the number of experts) are the
mode registry's (``parallel.modes.check_config``, ``check_world``, ``check_experts``), checked when
the job is validated and again at start-up, before any model is built or any token is routed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe.errors import check
from parallel.fssdp_config import FSSDPConfig


@dataclass(kw_only=True)
class ParallelConfig:
    """``parallel.*``: the mode, its group sizes, the dense placement and the process-group knobs."""

    mode: str = "none"
    """A mode registered in ``parallel.modes`` (none | ddp | fsdp | ep | fssdp); ``parallel_mode(mode)`` is its object."""
    ep_size: int = 0
    """Expert-parallel group size for mode=ep; 0 means the whole world."""
    dense: str = "ddp"
    """How non-expert parameters are data-parallel in a mode that splits experts (ep, fssdp): a mode that
    places dense parameters, ddp (replicated) | fsdp (FSDP2 sharded)."""
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
        check(self.ep_size >= 0, "parallel.ep_size", self.ep_size, "must be >= 0 (0 = world size)")
        check(self.timeout_s >= 1, "parallel.timeout_s", self.timeout_s, "must be >= 1")
        check(self.heartbeat_s >= 0, "parallel.heartbeat_s", self.heartbeat_s, "must be >= 0 (0 disables)")
        check(self.bucket_mb > 0, "parallel.bucket_mb", self.bucket_mb, "must be > 0")
