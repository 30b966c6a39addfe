"""The routing-flips probe across restarts: each MoE layer's last top-1 choices on the probe batch, in checkpoints.

Every evaluation runs validation batch 0 (the fixed probe batch) and compares each MoE layer's
top-1 expert per token with the previous evaluation's (``routing/layer{i}/flips``). Without the
previous choices a resumed run would report no flips at its first evaluation. So a checkpoint stores
them: every rank's top-1 ids as uint8 (or int16 above 256 experts), zlib-compressed and base64-encoded
into the trainer's JSON (gathered to rank 0, in rank order; about one byte per probe token per layer
before compression). A resume under the same world size gives each rank its own rows back, so the
first evaluation after a restart reports the flips the uninterrupted run reports. Under another
world size the ranks hold other rows of the probe batch: the saved choices are dropped (one info
line) and flips start again at the second evaluation.
"""

from __future__ import annotations

import base64
import logging
import zlib
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe.model import MoETransformer
from parallel import Runtime

log = logging.getLogger("moeforge")


def _encode(top1_T: torch.Tensor | None) -> str | None:
    if top1_T is None:
        return None
    ids = top1_T.detach().cpu().numpy()
    dtype = np.uint8 if ids.size == 0 or ids.max() < 256 else np.int16
    return f"{np.dtype(dtype).name}:" + base64.b64encode(zlib.compress(ids.astype(dtype).tobytes())).decode()


def _decode(text: str, device: torch.device) -> torch.Tensor:
    dtype, data = text.split(":", 1)
    ids = np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=np.dtype(dtype)).astype(np.int64)
    return torch.from_numpy(ids).to(device)


def probe_state(core: MoETransformer, runtime: Runtime) -> dict[str, Any]:
    """Every rank's last probe choices per MoE layer, for the checkpoint (a collective: every rank calls it)."""
    mine = {str(i): _encode(layer.probe_top1_T) for i, layer in core.moe_layers()}
    ranks: list[Any] = [mine]
    if runtime.world_size > 1 and dist.is_initialized():
        ranks = [None] * runtime.world_size
        dist.all_gather_object(ranks, mine)
    return {"world_size": runtime.world_size, "ranks": ranks}


def load_probe(core: MoETransformer, runtime: Runtime, state: dict[str, Any] | None) -> None:
    """Put this rank's saved probe choices back (``probe_state`` output), so the next evaluation reports flips."""
    for _, layer in core.moe_layers():
        layer.probe_top1_T, layer.previous_probe_top1_T = None, None
    if not state:
        return
    if int(state.get("world_size", 0)) != runtime.world_size:
        log.info(f"moeforge: the routing probe was saved by {state.get('world_size')} rank(s), this run has {runtime.world_size}; "
                 f"routing flips start again at the second evaluation")
        return
    mine = state["ranks"][runtime.rank]
    for i, layer in core.moe_layers():
        text = mine.get(str(i))
        if text is not None:
            layer.probe_top1_T = _decode(text, runtime.device)
