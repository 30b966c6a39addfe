"""``train.cuda_graphs=true``: replay each transformer block's kernels from CUDA graphs, and where that is refused.

A CUDA graph records a fixed sequence of kernels with fixed shapes and addresses and replays it
with one launch, which removes the per-kernel host cost that dominates small shapes (a 1024-wide
MoE layer spent 4.36 ms on an H200 for 3.45 ms of kernels). moeforge gets there through
``torch.compile(mode="reduce-overhead")`` on every block: inductor compiles the block and
torch's CUDA-graph trees capture the compiled forward and backward, re-recording only when a shape
changes. The optimizer step stays outside the graphs (fused AdamW is already one launch per
group). Capture needs a step that never reads the device on the host and whose shapes do not
depend on the data; ``refusal`` names every layout where that does not hold, before any compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from parallel.modes import parallel_mode

if TYPE_CHECKING:
    from launch.config import JobConfig
    from moe.expert_backends import ExpertBackend


def refusal(job: JobConfig, device: torch.device, backend: ExpertBackend) -> str | None:
    """Why ``train.cuda_graphs=true`` cannot run this job (one line naming the key), or None when it can.

    ``backend``: the expert backend the model resolved to on ``device``."""
    if device.type != "cuda":
        return f"train.cuda_graphs=true needs a CUDA device; this run is on {device.type}"
    why = parallel_mode(job.parallel.mode).capture_refusal
    if why is not None:
        return f"train.cuda_graphs=true: parallel={job.parallel.mode} {why}"
    if job.experts.capacity_factor is not None:
        return (f"train.cuda_graphs=true: experts.capacity_factor={job.experts.capacity_factor} drops tokens by data-dependent "
                f"counts; use dropless routing (capacity_factor=null)")
    if backend.reads_counts_on_host(device):
        return (f"train.cuda_graphs=true: experts.backend resolved to {backend.name}, which loops over experts with counts "
                f"read on the host; use grouped_mm (sm_90+) or triton")
    return None


def mark_step() -> None:
    """Tell torch's CUDA-graph trees that a new training step begins (outputs of the last replay may be reused)."""
    torch.compiler.cudagraph_mark_step_begin()
