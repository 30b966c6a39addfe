"""Expert parallelism: E / ep_size experts per rank, tokens moved by all-to-all.

Shape legend: T tokens, D model dim, F expert ffn dim, E experts (global), L local experts
(E / ep_size), R routed rows, P ranks in the EP group.

``shard_experts`` replaces each ``Experts`` module's stacked weights by this rank's block of
experts ``[ep_rank*L, (ep_rank+1)*L)``; ``ExpertParallelRunner`` is installed as the MoE layer's
``runner``: it sends each expert-sorted row to the rank that owns its expert and back
(``token_exchange.exchange_and_run``). It consumes only the ``DispatchPlan``, so routers with a
variable number of experts per token and capacity dropping work unchanged.

Gradients: an owner's expert gradient is the sum over every source rank's loss; the runtime
all-reduces it over the expert-data-parallel group (ranks holding the same experts) and divides
by the data-parallel world size, so it equals the gradient of the global mean loss
(DeepSpeed ``_reduce_expert_gradients``; research/distributed.md §a "Grad scale").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.dispatch import DispatchPlan, combine, gather_rows
from moe.experts import EXPERT_WEIGHT_NAMES, Experts
from moe.layer import MoELayer
from parallel.comm import CommMeter
from parallel.token_exchange import exchange_and_run


def apply_expert_parallel(layers: list[MoELayer], ep_group: dist.ProcessGroup | None, ep_rank: int, ep_size: int,
                          meter: CommMeter | None) -> None:
    """Wire every MoE layer for expert parallelism over ``ep_group`` (this rank is ``ep_rank`` of ``ep_size``).

    Each layer keeps only this rank's block of experts (``shard_experts``), records ``ep_group``
    as the group in which each expert lives once, and routes through an ``ExpertParallelRunner``.
    Both engines call it: the native one with its DeviceMesh's ``ep`` group, ``engine=deepspeed``
    with DeepSpeed's expert-parallel group (the same consecutive-rank layout). Gradient reduction
    over the expert-data-parallel group is the engine's (native: ``Runtime.before_optimizer_step``).
    """
    for layer in layers:
        shard_experts(layer.experts, ep_rank, ep_size)
        layer.experts.expert_group = ep_group  # each expert lives once per EP group
        layer.runner = ExpertParallelRunner(layer.num_experts, ep_group, ep_rank, ep_size, meter)


def shard_experts(experts: Experts, ep_rank: int, ep_size: int) -> list[int]:
    """Keep only this rank's contiguous block of experts (in place); returns their global ids."""
    E = experts.num_experts
    L = E // ep_size
    lo = ep_rank * L
    for name in EXPERT_WEIGHT_NAMES:
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full.detach()[lo : lo + L].clone(), requires_grad=full.requires_grad))
    experts.expert_ids = list(range(lo, lo + L))  # global id of each local row, for checkpoints
    return experts.expert_ids


class ExpertParallelRunner:
    """The MoE layer's runner under EP: dispatch rows to expert owners, combine their outputs."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None, ep_rank: int, ep_size: int, meter: CommMeter | None) -> None:
        self.num_experts, self.group, self.ep_rank, self.ep_size, self.meter = num_experts, group, ep_rank, ep_size, meter
        L = num_experts // ep_size
        self.owner_E = torch.arange(num_experts) // L
        self.held_H = torch.arange(ep_rank * L, (ep_rank + 1) * L)

    def __call__(self, experts: Experts, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        device = x_TD.device
        counts_E = plan.counts_E
        send_PE = torch.zeros(self.ep_size, self.num_experts, dtype=counts_E.dtype, device=device)
        send_PE.scatter_(0, self.owner_E.to(device).unsqueeze(0), counts_E.unsqueeze(0))
        y_RD = exchange_and_run(
            gather_rows(x_TD, plan),
            send_PE,
            self.held_H.to(device),
            experts.grouped_swiglu,
            self.group,
            self.meter,
            dest_sorted=True,
            name="ep_a2a_tokens",
        )
        return combine(y_RD, plan, x_TD.shape[0])
