"""Data parallelism for the parameters that every rank replicates: DDP-style averaging or FSDP2.

- ``GradAverager`` (``parallel.dense=ddp`` and ``parallel=ddp``): after backward, the gradients
  of the given parameters are flattened into buckets of ``bucket_mb`` and all-reduced (SUM, then
  divided by the data-parallel size): the same arithmetic as ``DistributedDataParallel``, done in
  place on the model so it keeps its class and attributes (``after_step``, ``moe_layers``). A
  parameter without a gradient on some ranks counts as zeros there, so every rank runs the same
  buckets; one without a gradient on every rank keeps none, as in one process (AdamW then skips
  it; a zero gradient would advance its step count and decay it). Which is which costs one
  small all-reduce of per-parameter flags per step.
- ``apply_fsdp`` (``parallel.dense=fsdp`` and ``parallel=fsdp``): ``fully_shard`` on each
  transformer block and on the root, with the expert parameters of EP/FSSDP left out
  (``ignored_params``); FSDP2 reduce-scatters (averaging) gradients during backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.comm import CommMeter, group_size


class GradAverager:
    """Average gradients of ``params`` over ``group`` in flat buckets (DDP semantics)."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None, bucket_mb: float, meter: CommMeter | None, name: str = "dense_allreduce") -> None:
        self.params, self.group, self.meter, self.name = params, group, meter, name
        self.bucket_elems = max(1, int(bucket_mb * 2**20 / 4))

    def _with_grad_anywhere(self, world: int) -> list[nn.Parameter]:
        """The parameters that have a gradient on at least one rank of the group."""
        flags = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32, device=self.params[0].device if self.params else "cpu")
        if world > 1 and self.params:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            if self.meter is not None:
                nbytes = 2 * (world - 1) / world * flags.numel() * flags.element_size()
                self.meter.add(self.name, nbytes, nbytes)
        return [p for p, f in zip(self.params, flags.tolist()) if f]

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

    @torch.no_grad()
    def sync(self, divide_by: int) -> None:
        """All-reduce SUM the gradients and divide them by ``divide_by`` (the data-parallel size)."""
        world = group_size(self.group)
        for bucket in self._buckets(self._with_grad_anywhere(world)):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            if world > 1:
                dist.all_reduce(flat, group=self.group)
                if self.meter is not None:  # ring all-reduce: 2 (W-1)/W of the buffer each way
                    nbytes = 2 * (world - 1) / world * flat.numel() * flat.element_size()
                    self.meter.add(self.name, nbytes, nbytes)
            if divide_by != 1:
                flat.div_(divide_by)
            offset = 0
            for p in bucket:
                g = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, ignored: set[nn.Parameter]) -> nn.Module:
    """FSDP2 over ``mesh``: one unit per transformer block (when the model has ``blocks``) and the root."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            mine = {p for p in block.parameters() if p in ignored}
            fully_shard(block, mesh=mesh, ignored_params=mine or None)
    fully_shard(model, mesh=mesh, ignored_params=set(ignored) or None)
    return model


def local_tensor(t: Tensor) -> Tensor:
    """The process-local part of a tensor (a DTensor's shard, or the tensor itself)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor sharded (not replicated) on some mesh dim."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(t, DTensor) and any(isinstance(pl, Shard) for pl in t.placements)
