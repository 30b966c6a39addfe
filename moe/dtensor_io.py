"""Reading and writing parameters that may be FSDP2 shards, from code that also runs in one process.

Under ``parallel=fsdp`` every parameter is a ``DTensor`` sharded on dim 0; elsewhere it is a
plain tensor. Phase events that rewrite weights outside autograd (EvoMoE's expert spawn and gate
reset) go through these two functions so they work in every mode.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: Tensor) -> tuple[int, Tensor]:
    """(global index of the first local row, the local rows) of a tensor sharded on dim 0 or whole.

    A DTensor's offset comes from torch's own sharding arithmetic
    (``compute_local_shape_and_global_offset``), so uneven FSDP2 shards are handled.
    """
    if not _is_dtensor(t):
        return 0, t
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    return offset[0], t.to_local()[: shape[0]]  # type: ignore[attr-defined]


def shard_group(t: Tensor) -> torch.distributed.ProcessGroup | None:
    """The process group over which a DTensor is sharded (1-D mesh), or None for a plain tensor."""
    return t.device_mesh.get_group() if _is_dtensor(t) else None  # type: ignore[attr-defined]


@torch.no_grad()
def copy_full_(param: Tensor, full: Tensor) -> None:
    """``param.copy_(full)`` where ``full`` is the whole value, identical on every rank.

    For a DTensor only the local shard is written (no communication: every rank slices the same
    ``full``).
    """
    full = full.to(device=param.device, dtype=param.dtype)
    if not _is_dtensor(param):
        param.copy_(full)
        return
    start, local = local_rows(param)
    local.copy_(full[start : start + local.shape[0]])
