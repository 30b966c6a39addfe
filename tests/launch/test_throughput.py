"""Model FLOPs per token, TFLOP/s and MFU (launch/throughput.py) against hand counts."""

from __future__ import annotations

import pytest
import torch

from launch.throughput import PEAK_TFLOPS, count_model, peak_tflops, window_metrics
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers.topk import TopKConfig


def test_tiny_model_flops_match_a_hand_count() -> None:
    # tiny: V 256, D 128, L 4, H 4, E 8 experts of F 256, top-2, untied head, every layer MoE.
    model = MoETransformer(ModelConfig(), TopKConfig(k=2), ExpertsConfig())
    counts = count_model(model, seq_len=128)
    attention = 4 * 128 * 128          # q, k, v and output projections
    router = 128 * 8
    experts_active = 2 * 3 * 128 * 256  # two experts, each gate, up (D x F) and down (F x D)
    head = 128 * 256
    active = 4 * (attention + router + experts_active) + head
    assert counts.active_params == active == 1_085_440
    norms = (2 * 4 + 1) * 128
    total = 256 * 128 + 4 * (attention + router + 8 * 3 * 128 * 256) + head + norms
    assert counts.total_params == total == sum(p.numel() for p in model.parameters())
    assert counts.flops_per_token == 6 * active + 12 * 4 * 4 * 32 * 128


def test_active_count_follows_k_dense_layers_gqa_shared_and_tied_embeddings() -> None:
    cfg = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, d_ff=32, dense_d_ff=96,
                      moe_every=2, num_shared_experts=1, tie_embeddings=True)
    with torch.device("meta"):  # counting needs no memory: presets of billions count the same way
        model = MoETransformer(cfg, TopKConfig(k=1), ExpertsConfig())
    counts = count_model(model, seq_len=16)
    attention = 64 * (4 + 2 * 2) * 16 + 64 * 64  # qkv with 2 kv heads of 16, then the output projection
    dense = 3 * 64 * 96
    moe = 64 * 4 + 1 * 3 * 64 * 32 + 3 * 64 * 32  # router, one routed expert, one shared expert
    head = 256 * 64  # the tied embedding, counted once as the output head
    assert counts.active_params == 2 * attention + dense + moe + head
    assert counts.flops_per_token == 6 * counts.active_params + 12 * 2 * 4 * 16 * 16


def test_window_metrics_and_peak_lookup() -> None:
    model = MoETransformer(ModelConfig(), TopKConfig(k=2), ExpertsConfig())
    counts = count_model(model, seq_len=128)
    # By hand, the tiny default (D 128, 4 layers of 4 heads of 32, 8 experts of F 256, top-2,
    # vocab 256, untied head): per layer qkv 128 x 384 + out 128 x 128 + router 128 x 8 + two
    # experts of 3 x 128 x 256 = 263,168; x 4 layers + head 128 x 256 = 1,085,440 active.
    # Attention 12 L H Q S = 12 x 4 x 4 x 32 x 128 = 786,432. 6 x 1,085,440 + 786,432 = 7,299,072.
    assert counts.active_params == 1_085_440
    assert counts.flops_per_token == 7_299_072
    out = window_metrics(counts, tokens=1_000_000, seconds=2.0, world_size=4, peak=500.0)
    tflops = 7_299_072 * 1e6 / 2.0 / 4 / 1e12
    assert out == pytest.approx({"tflops_per_gpu": tflops, "mfu": tflops / 500.0})
    assert "mfu" not in window_metrics(counts, 10, 1.0, 1, None)
    assert peak_tflops(torch.device("cpu"), "bf16") is None
    assert peak_tflops(torch.device("cpu"), "bf16", override=123.0) == 123.0
    # most specific name first: "H100 PCIe" must be found before "H100"
    names = list(PEAK_TFLOPS)
    assert names.index("H100 PCIe") < names.index("H100") and names.index("L40S") < names.index("L4")
