"""The rates ``tools.bench.step_budget`` turns counted work into time with, per card, each with its source.

Measured rates come from this repository's one GPU session (docs/bench_layer/2026-11-27-h200:
``results.md`` from ``tools.bench.layer``, ``profile.txt`` from ``tools.bench.profile_layer``, one
H200, torch 2.11). The H100 SXM has the same GH100 tensor cores and the same datasheet bf16 peak
(989.4 TFLOP/s), so its GEMM rates are taken equal to the H200's (an assumption, marked so); its
memory is slower (3.35 vs 4.8 TB/s), and its glue rate keeps the H200's measured fraction of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Card:
    key: str
    device_name: str
    """What ``torch.cuda.get_device_name`` reports (``moe.expert_backends.auto`` matches on it)."""
    capability: tuple[int, int]
    peak_bf16_tflops: float
    dense_gemm_tflops: float
    grouped_gemm_tflops: float
    attention_tflops: float
    """FlashAttention-2 fwd+bwd, FLOPs counted as its paper counts them (causal half, backward 2.5x)."""
    hbm_tbps: float
    glue_tbps: float
    """Bytes per second the non-GEMM kernels achieve (counted bytes / their measured time)."""
    launch_us: float
    """Host time to issue one launched op of an eager step (``tools.bench.step_budget.predict`` queues the
    ops: the GPU waits only when the host falls behind)."""
    memory_gb: float
    nvlink_gbps: float
    """Per GPU, one direction, achievable (tools.simulate_parallel's default)."""
    ib_gbps: float
    """Per GPU between nodes: one 400 Gb/s NIC per GPU."""
    sources: dict[str, str] = field(default_factory=dict, compare=False)


_BENCH = "docs/bench_layer/2026-11-27-h200"
_LAYER_HOST_US = 4360.0 / 86
"""The measured layer step's time over its launched ops (``_SHARED_SOURCES['launch_us']``)."""
_SHARED_SOURCES = {
    "peak_bf16_tflops": "NVIDIA H100/H200 SXM datasheets, dense bf16 (launch/throughput.py PEAK_TFLOPS)",
    "attention_tflops": "Dao 2023, FlashAttention-2, sec. 4.1: up to 335 TFLOP/s fwd+bwd on H100 (the kernel torch's SDPA runs)",
    "launch_us": f"{_BENCH}: the host-bound layer (1024, 2816, 16, 2, 16384) took 4.360 ms per step (results.md, layer:grouped_mm) "
                 f"while its kernels take 3.21 ms (profile.txt: 3.45 ms, less the 0.24 ms of six gradient-accumulation adds the bench "
                 f"does not run). The bench runs its steps back to back and reads nothing on the host between them, and the layer had "
                 f"no host sync (tools.layer_budget at that commit, cedb458: 0 syncs, 86 launched ops), so under the issue-queue model "
                 f"of tools.bench.step_budget the GPU waited on the host: 4.360 ms / 86 = 50.7 us of host time per launched op. (Until "
                 f"2026-12-03 this was (4.36 - 3.45) / 86 = 10.6 us, which treats every launch's host time as added to the GPU's: true "
                 f"only where a sync makes the host wait for the GPU every few ops, which this bench did not.) The layer's ops are "
                 f"Python-heavy (router, dispatch, autograd Functions): for plain aten ops this is an upper estimate",
    "nvlink_gbps": "tools.simulate_parallel SimConfig.intra_gbps (NVLink 4: 450 GB/s per direction on the datasheet)",
    "ib_gbps": "tools.simulate_parallel SimConfig.inter_gbps (one ConnectX-7 400 Gb/s NIC per GPU)",
}

CARDS: dict[str, Card] = {
    "h200": Card(
        "h200", "NVIDIA H200", (9, 0), 989.4, 700.0, 680.0, 335.0, 4.8, 2.9, _LAYER_HOST_US, 141.0, 300.0, 50.0,
        sources={
            **_SHARED_SOURCES,
            "dense_gemm_tflops": f"{_BENCH}/results.md dense_gemm rows: 685, 700, 737, 688 TFLOP/s at the four reference shapes",
            "grouped_gemm_tflops": f"{_BENCH}/profile.txt: torch._grouped_mm (CUTLASS) 673-692 TFLOP/s over the layer's nine GEMMs",
            "hbm_tbps": "NVIDIA H200 datasheet: 4.8 TB/s HBM3e",
            "glue_tbps": f"{_BENCH}/profile.txt non-GEMM ms vs tools.bench.layer_budget glue bytes: 6.40 GB / 2.25 ms = 2.84 TB/s "
                         f"(2048, 1024, 64, 8) and 11.97 GB / 4.04 ms = 2.96 TB/s (2048, 768, 128, 8): 0.60 of 4.8",
            "memory_gb": "NVIDIA H200 datasheet: 141 GB",
        },
    ),
    "h100": Card(
        "h100", "NVIDIA H100 80GB HBM3", (9, 0), 989.4, 700.0, 680.0, 335.0, 3.35, 2.0, _LAYER_HOST_US, 80.0, 300.0, 50.0,
        sources={
            **_SHARED_SOURCES,
            "dense_gemm_tflops": "assumed equal to the H200's (same GH100 tensor cores and datasheet peak)",
            "grouped_gemm_tflops": "assumed equal to the H200's (same GH100 tensor cores and datasheet peak)",
            "hbm_tbps": "NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3",
            "glue_tbps": "the H200's measured fraction (0.60) of datasheet bandwidth, times 3.35 TB/s",
            "memory_gb": "NVIDIA H100 SXM datasheet: 80 GB",
        },
    ),
}
