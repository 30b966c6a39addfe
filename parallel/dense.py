"""Data parallelism for the parameters that every rank replicates: DDP-style averaging or FSDP2.

- ``GradAverager`` (``parallel.dense=ddp`` and ``parallel=ddp``): after backward, the gradients
  of the given parameters are flattened into buckets of ``bucket_mb`` and all-reduced (SUM, then
  divided by the data-parallel size): the same arithmetic as ``DistributedDataParallel``, done in
  place on the model so it keeps its class and attributes (``after_step``, ``moe_layers``). A
  parameter without a gradient on some ranks counts as zeros there, so every rank runs the same
  buckets; one without a gradient on every rank keeps none, as in one process (AdamW then skips
  it; a zero gradient would advance its step count and decay it): each bucket carries one flag
  per parameter for that. With ``parallel.overlap_grad_reduce`` (default) buckets start during
  backward, overlapping the all-reduce with the rest of backward as DDP does.
- ``apply_fsdp`` (``parallel.dense=fsdp`` and ``parallel=fsdp``): ``fully_shard`` on each
  transformer block and on the root, with the expert parameters of EP/FSSDP left out
  (``ignored_params``); FSDP2 reduce-scatters (averaging) gradients during backward. FSDP2's
  collectives are outside ``CommMeter``; ``fsdp_step_bytes`` models them per step for ``comm/*``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.comm import CommMeter, group_size
from parallel.host_memory import mark_host


class GradAverager:
    """Average gradients of ``params`` over ``group`` in flat buckets (DDP semantics).

    Buckets are fixed at construction, in reverse parameter order (gradients of the last layers
    are ready first), each at most ``bucket_mb`` and of one dtype. One has-gradient flag per
    parameter is reduced with max over ranks, so a parameter without a gradient on every rank keeps
    none and one without a gradient on some ranks counts as zeros there. Whether a gradient exists
    is a host fact: with ``host_max`` (a gloo all-reduce of a CPU tensor, ``Runtime.all_reduce_host_max_``)
    the flags travel there and ``sync`` reads nothing from the device; without it they ride at the
    end of each bucket's all-reduce and are read back (a host sync on a GPU).

    With ``overlap`` (``attach``), a bucket's all-reduce starts asynchronously during backward as
    soon as all its gradients are accumulated *and* every earlier bucket has started, so every rank
    launches the same buckets in the same order whatever its gradients. ``sync`` starts the rest
    (buckets holding a parameter without a gradient here) and waits for all: DDP's overlap of
    communication with backward (Li et al., VLDB 2020, §3.2.3). Without ``overlap`` all buckets
    run in ``sync``, after backward.
    """

    def __init__(
        self, params: list[nn.Parameter], group: dist.ProcessGroup | None, bucket_mb: float, meter: CommMeter | None,
        name: str = "dense_allreduce", *, overlap: bool = False, host_max: Callable[[Tensor], None] | None = None,
    ) -> None:
        self.params, self.group, self.meter, self.name = params, group, meter, name
        self.host_max = host_max
        self.bucket_elems = max(1, int(bucket_mb * 2**20 / 4))
        self.buckets = self._buckets(list(reversed(params)))
        self.world = group_size(group)
        self.paused = False
        """While set (gradient accumulation's earlier micro-batches), backward starts no bucket."""
        self._reset()
        if overlap and self.world > 1:
            index = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
            for p in params:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: self._ready(p, index[id(p)]))

    def _buckets(self, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
        buckets: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in params:
            if current and (size + p.numel() > self.bucket_elems or p.dtype != current[0].dtype):
                buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            buckets.append(current)
        return buckets

    def _reset(self) -> None:
        self._waiting = [len(b) for b in self.buckets]  # gradients not yet accumulated, per bucket
        self._seen: set[int] = set()
        self._started: list[tuple[Tensor, object]] = []  # (flat buffer, work handle) in bucket order
        self._host_flags: list[Tensor] = []  # with host_max: each started bucket's has-gradient flags (CPU)

    def _ready(self, p: nn.Parameter, b: int) -> None:
        if self.paused:  # a micro-batch before the last of a step: keep accumulating locally
            return
        if id(p) in self._seen:
            raise RuntimeError(
                "parallel.overlap_grad_reduce: a gradient was accumulated twice before the optimizer step "
                "(two backward passes?); its bucket may already be reduced. Set parallel.overlap_grad_reduce=false."
            )
        self._seen.add(id(p))
        self._waiting[b] -= 1
        while len(self._started) < len(self.buckets) and self._waiting[len(self._started)] == 0:
            self._start(len(self._started))

    def _start(self, b: int) -> None:
        bucket = self.buckets[b]
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
        if self.host_max is not None:
            self._host_flags.append(torch.tensor([p.grad is not None for p in bucket], dtype=torch.float32))
            flat = torch.cat(grads)
        else:
            flags = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype, device=bucket[0].device)
            flat = torch.cat([*grads, flags])
        work = None
        if self.world > 1:
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            if self.meter is not None:  # ring all-reduce: 2 (W-1)/W of the buffer each way
                nbytes = 2 * (self.world - 1) / self.world * flat.numel() * flat.element_size()
                self.meter.add(self.name, nbytes, nbytes)
        self._started.append((flat, work))

    @torch.no_grad()
    def sync(self, divide_by: int) -> None:
        """Finish the all-reduce (SUM) of every bucket and divide the gradients by ``divide_by``."""
        while len(self._started) < len(self.buckets):
            self._start(len(self._started))
        host_flags: list[list[float]] = []
        if self.host_max is not None:
            every = mark_host(torch.cat(self._host_flags))
            self.host_max(every)
            values, start = every.tolist(), 0
            for bucket in self.buckets:
                host_flags.append(values[start : start + len(bucket)])
                start += len(bucket)
        for b, (bucket, (flat, work)) in enumerate(zip(self.buckets, self._started)):
            if work is not None:
                work.wait()
            flags = host_flags[b] if host_flags else flat[-len(bucket):].tolist()
            if divide_by != 1:
                flat.div_(divide_by)
            offset = 0
            for p, flag in zip(bucket, flags):
                g = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if not flag:  # no rank had a gradient: as in one process, there is none
                    p.grad = None
                elif p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        self._reset()


@dataclass(frozen=True)
class FsdpUnit:
    """One FSDP2 parameter group, as the byte meter models it."""

    shard_bytes: int
    """This rank's padded shard of the group (dim 0 split in ceil(n / W) rows, as FSDP2 pads)."""
    gathers_per_step: int
    """All-gathers per training step: 2 (forward, and again in backward: resharded after forward)
    for a block, 1 for the root, which FSDP2 keeps unsharded for backward by default."""


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, ignored: set[nn.Parameter]) -> list[FsdpUnit]:
    """FSDP2 over ``mesh``: one unit per transformer block (when the model has ``blocks``) and the root.

    Returns the units for ``fsdp_step_bytes`` (FSDP2 runs its own collectives, outside ``CommMeter``).
    """
    from torch.distributed.fsdp import fully_shard

    world = mesh.size()
    blocks = getattr(model, "blocks", None)
    blocks = list(blocks) if isinstance(blocks, nn.ModuleList) else []
    # Group membership first: fully_shard replaces the Parameter objects it shards.
    in_blocks = {p for block in blocks for p in block.parameters()}
    units = [FsdpUnit(_padded_shard_bytes([p for p in block.parameters() if p not in ignored], world), 2) for block in blocks]
    units.append(FsdpUnit(_padded_shard_bytes([p for p in model.parameters() if p not in ignored and p not in in_blocks], world), 1))
    for block in blocks:
        mine = {p for p in block.parameters() if p in ignored}
        fully_shard(block, mesh=mesh, ignored_params=mine or None)
    fully_shard(model, mesh=mesh, ignored_params=set(ignored) or None)
    return units


def _padded_shard_bytes(params: list[nn.Parameter], world: int) -> int:
    total = 0
    for p in params:
        rows = p.shape[0] if p.dim() else 1
        total += -(-rows // world) * (p.numel() // max(rows, 1)) * p.element_size()
    return total


def fsdp_step_bytes(units: list[FsdpUnit], world: int) -> dict[str, float]:
    """Bytes each rank sends (and receives) per training step in FSDP2's collectives (ring algorithms):
    every all-gather moves (W-1) shards each way, every reduce-scatter of the gradients too. A
    model of FSDP2's schedule (forward gather, backward re-gather except the root, one gradient
    reduce-scatter), not a count of its calls; evaluation forwards are not included."""
    return {
        "fsdp_allgather": float(sum(u.gathers_per_step * (world - 1) * u.shard_bytes for u in units)),
        "fsdp_reducescatter": float(sum((world - 1) * u.shard_bytes for u in units)),
    }


def local_tensor(t: Tensor) -> Tensor:
    """The process-local part of a tensor (a DTensor's shard, or the tensor itself)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor sharded (not replicated) on some mesh dim."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(t, DTensor) and any(isinstance(pl, Shard) for pl in t.placements)
