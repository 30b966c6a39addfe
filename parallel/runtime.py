"""``Runtime``: where this process sits (``MeshInfo``) and the collectives the trainer uses.

``parallel.layout.setup_runtime`` builds it for ``parallel.mode`` and ``apply_parallel`` lets the
mode's object (``parallel.modes``) wire the model into it (gradient averager, FSDP2 units, expert
groups, FSSDP state); this module knows no mode by name.

The trainer's sequence per step: forward/backward on its rows of the global batch with the
per-rank mean loss, ``before_optimizer_step`` (finish gradient reduction and divide expert
gradients by the data-parallel size W, so every gradient equals the single-process gradient of
the global mean loss), ``clip_grad_norm_``, ``optimizer.step``, ``after_optimizer_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moe.experts import EXPERT_WEIGHT_NAMES
from moe.layer import MoELayer
from parallel.comm import CommMeter
from parallel.config import ParallelConfig
from parallel.dense import FsdpUnit, GradAverager, fsdp_step_bytes, is_sharded, local_tensor
from parallel.fssdp import FSSDPState
from parallel.heartbeat import Heartbeat, RankFailure

__all__ = ["MeshInfo", "Runtime"]


@dataclass
class MeshInfo:
    """Where this process sits, and the groups each parallel mode communicates over."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    mesh: DeviceMesh | None
    """1-D ``("dp",)`` mesh over every rank (dense data parallelism, FSSDP), None in mode none."""
    ep_mesh: DeviceMesh | None = None
    """2-D ``("edp", "ep")`` mesh in mode ep, and in mode fssdp with shard_size below the world."""
    ep_size: int = 1

    @property
    def node(self) -> int:
        """Index of this rank's node (ranks are numbered node-major by torchrun)."""
        return self.rank // self.local_world_size

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group of mesh dim ``dim`` (``dp``, ``ep``, ``edp``), or None without a mesh."""
        mesh = self.ep_mesh if dim in ("ep", "edp") else self.mesh
        return None if mesh is None else mesh.get_group(dim)


@dataclass
class Runtime:
    """Where this process sits in the job and the collectives the trainer uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cfg: ParallelConfig = field(default_factory=ParallelConfig)
    mesh: MeshInfo | None = None
    meter: CommMeter = field(default_factory=CommMeter)
    dense_sync: GradAverager | None = None
    fsdp_units: list[FsdpUnit] = field(default_factory=list)
    """FSDP2 parameter groups (parallel=fsdp or dense=fsdp), for the modeled ``comm/fsdp_*`` bytes."""
    expert_modules: list[nn.Module] = field(default_factory=list)
    expert_group: dist.ProcessGroup | None = None
    """ep / hybrid fssdp: the group of ranks that hold the same experts (None: no replicas)."""
    expert_replicas: int = 1
    fssdp: FSSDPState | None = None
    heartbeat: Heartbeat | None = None
    replicated: bool = True
    """Every parameter and gradient whole on every rank (the mode's ``replicates_parameters``): in one
    process, ``clip_grad_norm_`` is then torch's own."""
    """Peer liveness through the rendezvous store (parallel.heartbeat_s; None in one process)."""
    _steps: int = 0
    _host_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None and self.world_size > 1

    def expert_params(self) -> list[nn.Parameter]:
        """This rank's expert weights under ep/fssdp (looked up live: FSSDP re-ownership swaps them)."""
        return [getattr(m, n) for m in self.expert_modules for n in EXPERT_WEIGHT_NAMES]

    def _all_reduce_(self, tensors: list[Tensor], op: dist.ReduceOp) -> None:
        if not self.distributed or not tensors:
            return
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, op=op)
            offset = 0
            for t in ts:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor across ranks in place (one collective per dtype; no-op in one process)."""
        self._all_reduce_(tensors, dist.ReduceOp.SUM)

    @torch.no_grad()
    def sum_counts(self, counts_E: Tensor) -> Tensor:
        """``counts_E`` summed over the data-parallel ranks (a fresh tensor; the global-batch
        balance loss's ``f``, moe.routers.losses.switch_balance_loss); metered as ``comm/balance_counts``."""
        total_E = counts_E.detach().clone()
        dist.all_reduce(total_E, group=self.mesh.group("dp") if self.mesh is not None else None)
        nbytes = total_E.numel() * total_E.element_size()
        self.meter.add("balance_counts", nbytes, nbytes)
        return total_E

    def install_count_sum(self, model: nn.Module) -> None:
        """Give every MoE layer of ``model`` this runtime's ``sum_counts`` (the one hook behind
        ``router.balance_scope=global``); nothing in one process, where it would be the identity."""
        if not self.distributed:
            return
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.sum_counts = self.sum_counts

    def all_reduce_max_(self, tensors: list[Tensor]) -> None:
        """Max of each tensor across ranks in place (no-op in one process)."""
        self._all_reduce_(tensors, dist.ReduceOp.MAX)

    def all_reduce_host_max_(self, t: Tensor) -> None:
        """Max of a CPU tensor of host values across ranks, in place, over gloo (no device involved; no-op in one process).

        Every rank must call it at the same point; the first call creates the gloo group under NCCL."""
        if not self.distributed:
            return
        if self._host_group is None:
            self._host_group = dist.new_group(backend="gloo") if self.mesh is not None and self.mesh.backend != "gloo" else dist.group.WORLD
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._host_group)

    @torch.no_grad()
    def grad_norm(self, model: nn.Module) -> Tensor:
        """Global L2 norm of all gradients, each parameter element counted exactly once.

        Replicated gradients count once from this rank; FSDP2 shards are summed over ranks; EP
        and FSSDP experts are summed over ranks and divided by the number of copies (each expert
        lives on ``expert_replicas`` ranks: EP's expert-data-parallel groups, hybrid FSSDP's
        groups; 1 for plain FSSDP). Expert norms are never averaged as if replicated
        (research/distributed.md pain point 3).
        """
        experts = {id(p) for p in self.expert_params()}
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        spread = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in model.parameters():
            if p.grad is None:
                continue
            sq = local_tensor(p.grad).detach().double().pow(2).sum()
            if id(p) in experts:
                spread += sq / self.expert_replicas
            elif is_sharded(p.grad):
                spread += sq
            else:
                replicated += sq
        if self.distributed:
            dist.all_reduce(spread)
        return (replicated + spread).sqrt().float()

    @torch.no_grad()
    def total_grad_norm(self, model: nn.Module) -> Tensor:
        """The global gradient L2 norm (as ``clip_grad_norm_`` returns it) without clipping."""
        if not self.distributed and self.replicated:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if any(g.dtype != torch.float32 for g in grads):  # optim.master_weights' bf16 expert gradients
                return mixed_grad_norm(grads)
            return torch.nn.utils.get_total_norm(grads)
        return self.grad_norm(model)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip gradients to ``max_norm`` by their global L2 norm; returns the norm before clipping.

        Same formula as ``torch.nn.utils.clip_grad_norm_``: grads *= min(1, max_norm / (norm + 1e-6)).
        """
        if not self.distributed and self.replicated:
            params = [p for p in model.parameters() if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = self.grad_norm(model)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    local_tensor(p.grad).mul_(coef.to(p.grad.dtype))
        return norm

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, enabled: bool) -> Iterator[None]:
        """Backward passes inside run with (``enabled``) or without gradient communication.

        Gradient accumulation runs its earlier micro-batches with ``enabled=False``: the overlapped
        DDP buckets do not start and FSDP2 keeps unsharded gradients, so each rank sums its
        micro-batches locally and the last backward communicates the sum once (DDP's ``no_sync``).
        Expert gradients (EP, FSSDP) are reduced in ``before_optimizer_step`` or, for FSSDP's
        sparse reduce-scatter, summed into their owners per backward, which adds up the same.
        """
        if enabled or self.mesh is None:
            yield
            return
        if self.dense_sync is not None:
            self.dense_sync.paused = True
        fsdp_modules = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
        for m in fsdp_modules:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            if self.dense_sync is not None:
                self.dense_sync.paused = False
            for m in fsdp_modules:
                m.set_requires_gradient_sync(True, recurse=False)

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module) -> None:
        """Finish gradient communication: dense averaging (ddp), expert reduction and 1/W scaling."""
        self._steps += 1
        if self.mesh is None:
            return
        W = self.world_size
        if self.dense_sync is not None:
            self.dense_sync.sync(divide_by=W)
        if self.fsdp_units:
            for name, nbytes in fsdp_step_bytes(self.fsdp_units, W).items():
                self.meter.add(name, nbytes, nbytes)
        experts = self.expert_params()
        for p in experts:
            if p.grad is None:  # every rank must join the same reductions
                p.grad = torch.zeros_like(p)
        if experts and self.expert_replicas > 1:  # ep with edp groups, or hybrid fssdp: sum the twins
            GradAverager(experts, self.expert_group, self.cfg.bucket_mb, self.meter, "expert_allreduce").sync(divide_by=W)
        elif experts:
            for p in experts:
                p.grad.div_(W)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """FSSDP: all-reduce the step's routing counts, re-own experts when due, plan the next step."""
        if self.fssdp is not None:
            self.fssdp.end_step(optimizer)

    def comm_metrics(self, over_ranks: bool = False) -> dict[str, float]:
        """Bytes sent/received per collective per optimizer step since the last call (``comm/...``).

        This rank's bytes; ``over_ranks``: summed over all ranks (a collective: every rank calls it),
        the job's traffic per step, which is what the trainer logs. A key missing on some rank counts 0 there.
        """
        steps = max(self._steps, 1)
        self._steps = 0
        mine = {k: v / steps for k, v in self.meter.pop().items()}
        if not over_ranks or not self.distributed:
            return mine
        every: list[dict[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        keys = sorted({k for d in every if d for k in d})
        return {k: sum(d.get(k, 0.0) for d in every if d) for k in keys}

    def mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Each scalar's mean over ranks (one all-reduce; a host read): e.g. the step's aux and z losses."""
        if not values:
            return {}
        stacked = torch.stack([v.detach().double().reshape(()) for v in values.values()])
        self.all_reduce_sum_([stacked])
        return dict(zip(values, (stacked / self.world_size).tolist()))

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if dist.is_initialized():
            dist.barrier()

    def peer_failure(self, err: Exception) -> RankFailure | None:
        """A ``RankFailure`` naming the rank that failed first when ``err`` came from another rank's
        failure; None when ``err`` is this rank's own (then posted for the others to name)."""
        return self.heartbeat.peer_failure(err) if self.heartbeat is not None else None

    def shutdown(self) -> None:
        """Stop the heartbeat and tear down the process group, if any."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def mixed_grad_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of gradients of mixed dtypes, accumulated and returned in fp32. ``torch.nn.utils.get_total_norm``
    returns each dtype group's norm in that dtype (a bf16 group's norm rounded to 8 bits) before combining;
    here each tensor's norm is fp32 (``_foreach_norm``'s ``dtype``), so bf16 gradients give the norm of their fp32 values."""
    norms: list[Tensor] = []
    for dtype in sorted({g.dtype for g in grads}, key=str):  # one list per dtype: torch's multi-tensor kernel takes one dtype
        norms.extend(torch._foreach_norm([g for g in grads if g.dtype == dtype], 2.0, dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)
