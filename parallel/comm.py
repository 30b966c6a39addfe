"""Collectives used by the parallel modes, with byte accounting.

Shape legend: N rows of any width, P ranks in the group.

``all_to_all_rows`` is an autograd Function around ``all_to_all_single`` with variable splits:
its backward runs the reverse exchange (send and receive splits swapped), so gradients of the
rows return to where the rows came from. Every rank must call it, also with zero rows to send
or receive, so no rank waits on a peer that skipped the collective.

``CommMeter`` counts bytes this rank sends to and receives from *other* ranks (its own segment of
an all-to-all never leaves the process) per collective name; the runtime reports and resets it
once per step as ``comm/<name>_bytes_sent`` and ``comm/<name>_bytes_recv``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor


class CommMeter:
    """Bytes sent/received per collective name since the last ``pop``."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = defaultdict(float)
        self.recv: dict[str, float] = defaultdict(float)

    def add(self, name: str, sent: float, recv: float) -> None:
        self.sent[name] += float(sent)
        self.recv[name] += float(recv)

    def pop(self) -> dict[str, float]:
        """The per-collective counters as metric keys, plus totals; resets the counters."""
        out: dict[str, float] = {}
        for name in sorted(set(self.sent) | set(self.recv)):
            out[f"comm/{name}_bytes_sent"] = self.sent[name]
            out[f"comm/{name}_bytes_recv"] = self.recv[name]
        if out:
            out["comm/total_bytes_sent"] = sum(self.sent.values())
            out["comm/total_bytes_recv"] = sum(self.recv.values())
        self.sent.clear()
        self.recv.clear()
        return out


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_to_all_raw(
    x_N: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None, meter: CommMeter | None, name: str
) -> Tensor:
    """``all_to_all_single`` without autograd; ``in_splits[p]`` rows go to peer p, ``out_splits[p]`` come from it."""
    assert sum(in_splits) == x_N.shape[0], (sum(in_splits), x_N.shape)
    out = x_N.new_empty((sum(out_splits), *x_N.shape[1:]))
    if group_size(group) == 1:
        out.copy_(x_N)
        return out
    dist.all_to_all_single(out, x_N.contiguous(), out_splits, in_splits, group=group)
    if meter is not None:
        me = group_rank(group)
        row_bytes = math.prod(x_N.shape[1:]) * x_N.element_size()
        meter.add(name, (sum(in_splits) - in_splits[me]) * row_bytes, (sum(out_splits) - out_splits[me]) * row_bytes)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_N: Tensor, out_splits: list[int], in_splits: list[int], group, meter, name: str) -> Tensor:  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.meter, ctx.name = out_splits, in_splits, group, meter, name
        return all_to_all_raw(x_N, out_splits, in_splits, group, meter, name)

    @staticmethod
    def backward(ctx, g_N: Tensor):  # type: ignore[override]
        g_in = all_to_all_raw(g_N, ctx.in_splits, ctx.out_splits, ctx.group, ctx.meter, ctx.name + "_bwd")
        return g_in, None, None, None, None, None


def all_to_all_rows(
    x_N: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None, meter: CommMeter | None = None, name: str = "a2a"
) -> Tensor:
    """Differentiable variable-split all-to-all of rows; backward is the reverse all-to-all."""
    return _AllToAllRows.apply(x_N, out_splits, in_splits, group, meter, name)


def exchange_counts(send_PX: Tensor, group: dist.ProcessGroup | None, meter: CommMeter | None = None) -> Tensor:
    """Send row ``p`` of ``send_PX`` (int64 counts) to peer p; return the rows received, by source."""
    P, X = send_PX.shape
    recv = all_to_all_raw(send_PX.reshape(-1), [X] * P, [X] * P, group, meter, "counts")
    return recv.view(P, X)
