"""How well a step uses the hardware: model FLOPs per token, TFLOP/s per GPU, MFU, peak memory.

Model FLOPs (Chowdhery et al. 2022, "PaLM", appendix B; the convention of Megatron-LM and
torchtitan) count the matrix products a token needs, forward and backward, whether or not the run
recomputes activations:

    flops_per_token = 6 * N_active + 12 * L * H * Q * S

- ``N_active``: the parameters one token's forward multiplies with, as the model counts them
  (``MoETransformer.active_params``) — attention projections, every dense FFN, each router, the
  ``k`` routed experts it is sent to (``k`` = the router config's ``experts_per_token``; 1 for
  routers without one), shared experts, and the output head. The input embedding
  (a lookup) and norm weights (elementwise) do no matrix products and are left out; a tied
  embedding counts once, as the head. 6 = 2 (multiply-add) x 3 (forward, and backward for inputs
  and weights).
- ``12 * L * H * Q * S``: attention scores and the weighted sum over ``S`` positions, ``L``
  layers of ``H`` heads of size ``Q``, forward and backward, counted over the full square as PaLM
  does (a causal kernel skips half of it).

TFLOP/s per GPU = flops_per_token x tokens in the window / seconds / ranks; MFU = that / the
device's dense peak for the run's precision (``PEAK_TFLOPS``, or ``train.peak_tflops``).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from moe.model import MoETransformer

TIMING_KEYS = ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gib")
"""Logged keys measured from the clock or the process (not from the computation): two runs of the
same steps, or a resumed run, differ in these and only these."""

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Dense (no 2:4 sparsity) tensor-core bf16 and plain fp32 peaks from NVIDIA's datasheets, most
    # specific name first (a name matches when it occurs in torch.cuda.get_device_name()).
    "H100 PCIe": {"bf16": 756.5, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a model and the FLOPs one training token costs at ``seq_len``."""

    total_params: int
    active_params: int
    """N_active of the module docstring."""
    flops_per_token: float

    def describe(self) -> str:
        return f"{self.total_params / 1e6:,.1f}M parameters, {self.active_params / 1e6:,.1f}M active per token"


def count_model(model: MoETransformer, seq_len: int) -> ModelCounts:
    """Count ``model``'s parameters (any device, ``meta`` included) before any parallel rewiring;
    the active ones are the model's own count (``MoETransformer.active_params``)."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    active = model.active_params()
    head_dim = cfg.d_model // cfg.num_heads
    attention = 12 * cfg.num_layers * cfg.num_heads * head_dim * seq_len
    return ModelCounts(total, active, 6.0 * active + attention)


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> float | None:
    """Dense peak TFLOP/s of ``device`` for ``precision`` (bf16 | fp32): ``override`` when > 0, else
    the table's entry for a known GPU, else None (MFU is then not reported)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory in GiB: the CUDA allocator's peak since the last ``reset_peak_memory``, or on a
    CPU the process's peak resident set since it started (Linux ``ru_maxrss`` is in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; the CPU figure is a process-lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def window_metrics(counts: ModelCounts, tokens: int, seconds: float, world_size: int, peak: float | None) -> dict[str, float]:
    """``tflops_per_gpu`` and (with a known peak) ``mfu`` for ``tokens`` trained in ``seconds``."""
    tflops = counts.flops_per_token * tokens / max(seconds, 1e-9) / world_size / 1e12
    out = {"tflops_per_gpu": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out
