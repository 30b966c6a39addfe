"""Send routed rows to the ranks that hold their experts, run the experts there, bring results back.

Shape legend: R routed rows on this rank (expert-sorted, as ``moe.dispatch`` lays them out),
D model dim, E experts (global ids), H experts held (materialised) on this rank, P ranks.

Used by expert parallelism (each expert held by exactly one rank of the EP group) and by FSSDP
(an expert may be held by several ranks; its rows are split among them). The plan is a count
matrix ``send_PE``: how many of this rank's rows of expert e go to peer p. Rows of one expert are
contiguous in ``x_RD``; the first ``send_PE[0, e]`` go to peer 0, the next to peer 1, and so on.

Protocol (one counts exchange, one row all-to-all each way, as in the EP spec of
research/distributed.md §b):

1. ``recv_PE = all_to_all(send_PE)``: what each source sends me, per expert.
2. rows re-ordered destination-major (expert order kept inside a destination), exchanged with
   splits ``send_PE.sum(1)`` / ``recv_PE.sum(1)``.
3. received rows (source-major) stably sorted by expert -> the grouped-GEMM layout over H.
4. outputs un-sorted, exchanged back with the splits swapped, un-sorted to the input order.

Both exchanges are ``all_to_all_rows`` autograd Functions, so backward retraces the route.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.comm import CommMeter, all_to_all_rows, exchange_counts

ExpertFn = Callable[[Tensor, Tensor], Tensor]


def inverse_permutation(perm_N: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv_N = torch.empty_like(perm_N)
    inv_N[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
    return inv_N


def exchange_and_run(
    x_RD: Tensor,
    send_PE: Tensor,
    held_H: Tensor,
    fn: ExpertFn,
    group: dist.ProcessGroup | None,
    meter: CommMeter | None = None,
    dest_sorted: bool = False,
    name: str = "a2a_tokens",
) -> Tensor:
    """Route ``x_RD`` by ``send_PE``, run ``fn(rows sorted by held expert, counts_H)``, return ``y_RD``.

    ``held_H`` lists (ascending) the global experts this rank runs; every row it receives must
    belong to one of them. ``dest_sorted`` says the expert-sorted rows are already in destination
    order (true for EP, where experts are laid out in rank-contiguous blocks) and skips a sort.
    """
    P, E = send_PE.shape
    device = x_RD.device
    counts_E = send_PE.sum(0)
    if dest_sorted:
        x_send, send_order = x_RD, None
    else:
        # destination of each row: inside expert e's segment, peers in order with send_PE[:, e] rows each.
        R = x_RD.shape[0]  # output sizes given: no host read of the counts
        dest_R = torch.repeat_interleave(torch.arange(P, device=device).repeat(E), send_PE.t().reshape(-1), output_size=R)
        expert_R = torch.repeat_interleave(torch.arange(E, device=device), counts_E, output_size=R)
        send_order = torch.argsort(dest_R * E + expert_R, stable=True)
        x_send = x_RD.index_select(0, send_order)
    recv_PE = exchange_counts(send_PE, group, meter)
    # The one host read of the exchange: all_to_all needs its split sizes on the host.
    in_splits, out_splits = torch.stack([send_PE.sum(1), recv_PE.sum(1)]).tolist()
    x_recv = all_to_all_rows(x_send, out_splits, in_splits, group, meter, name)
    # Received rows are source-major, expert-ascending inside a source; make them expert-major.
    expert_N = torch.repeat_interleave(torch.arange(E, device=device).repeat(P), recv_PE.reshape(-1), output_size=sum(out_splits))
    perm_N = torch.argsort(expert_N, stable=True)
    counts_H = recv_PE.sum(0).index_select(0, held_H)
    y_held = fn(x_recv.index_select(0, perm_N), counts_H)
    y_recv = y_held.index_select(0, inverse_permutation(perm_N))
    y_send = all_to_all_rows(y_recv, in_splits, out_splits, group, meter, name)
    if send_order is None:
        return y_send
    return y_send.index_select(0, inverse_permutation(send_order))
