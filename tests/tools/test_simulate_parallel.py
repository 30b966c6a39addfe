"""tools/simulate_parallel.py on a case small enough to compute by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.simulate_parallel import SimConfig, loads_from_metrics, main, simulate_ep, simulate_fssdp, zipf_loads

# 2 GPUs on one node, 2 experts, top-1, D=4, F=8, 10 tokens per GPU, fp32, 1 GB/s links, 1 TFLOP/s.
CFG = SimConfig(gpus=2, gpus_per_node=2, num_experts=2, num_layers=1, k=1, d_model=4, d_ff=8, tokens_per_gpu=10,
                bytes_per_elem=4, intra_gbps=1.0, inter_gbps=1.0, tflops=1.0, t=1, m=1)
ROW = 4 * 4  # bytes of one token row
CHUNK = 3 * 4 * 8 * 4  # bytes of one expert
FLOPS_PER_SLOT = 18 * 4 * 8


def test_ep_uniform_load_hand_computed() -> None:
    est = simulate_ep([[0.5, 0.5]], CFG)
    # Each GPU sends half of its 10 slots (5 rows) to the other GPU, 4 all-to-alls per step.
    assert est.token_bytes_max == 4 * 5 * ROW == 320
    assert est.weight_bytes_max == 0
    assert est.comm_s == pytest.approx(320 / 1e9)
    assert est.compute_max_s == pytest.approx(10 * FLOPS_PER_SLOT / 1e12)
    assert est.straggler_s == pytest.approx(0.0)


def test_fssdp_hot_expert_replicated_hand_computed() -> None:
    # Loads 3:1, t=m=1: expert 0 (owner GPU 0) held by both GPUs, expert 1 only by GPU 1.
    est = simulate_fssdp([[0.75, 0.25]], CFG)
    # Only GPU 0's 2.5 slots of expert 1 cross: 4 * 2.5 rows.
    assert est.token_bytes_max == pytest.approx(4 * 2.5 * ROW)
    # GPU 0 sends expert 0 (spAG) and receives its gradient (spRS): one chunk each way.
    assert est.weight_bytes_max == CHUNK
    assert est.comm_s == pytest.approx((160 + 384) / 1e9)
    # GPU 1 computes 7.5 (expert 0) + 2.5 + 2.5 (expert 1) slots; mean is 10.
    assert est.compute_max_s == pytest.approx(12.5 * FLOPS_PER_SLOT / 1e12)
    assert est.straggler_s == pytest.approx(2.5 * FLOPS_PER_SLOT / 1e12)
    # EP on the same skewed load: GPU 0 receives 10 * 0.75 rows per a2a and computes 15 slots.
    ep = simulate_ep([[0.75, 0.25]], CFG)
    assert ep.token_bytes_max == pytest.approx(4 * 7.5 * ROW)
    assert ep.straggler_s == pytest.approx(5 * FLOPS_PER_SLOT / 1e12)


def test_loads_from_metrics_and_zipf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "routing/layer0/tokens_per_expert": [3, 1]}, {"step": 2, "routing/layer0/tokens_per_expert": [3, 1], "loss": 1.0}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert loads_from_metrics(f) == [[0.75, 0.25]]
    assert zipf_loads(2, 1.0) == [[2 / 3, 1 / 3]]
    main(["--metrics", str(f), "--gpus", "2", "--num-experts", "2", "--gpus-per-node", "2"])
    out = capsys.readouterr().out
    assert out.count("\n| 2 | ") == 2 and "| EP |" in out and "| FSSDP |" in out


def test_hybrid_fssdp_is_the_group_plus_a_replica_all_reduce_hand_computed() -> None:
    # 4 GPUs in 2 groups of 2, 4 experts (2 owned per GPU in a group), D=4, F=8, 2-byte elements:
    # one expert is 3*4*8*2 = 192 bytes; the replica all-reduce of 2 owned experts over R=2 copies
    # moves 2 (R-1)/R * 384 = 384 bytes. Tokens, compute and memory are the 2-GPU group's.
    base = dict(num_experts=4, d_model=4, d_ff=8, tokens_per_gpu=64, gpus_per_node=2, t=1, m=1)
    loads = zipf_loads(4, 1.0)
    group = simulate_fssdp(loads, SimConfig(gpus=2, **base))
    hybrid = simulate_fssdp(loads, SimConfig(gpus=4, fssdp_shard=2, **base))
    assert hybrid.token_bytes_max == group.token_bytes_max and hybrid.compute_max_s == group.compute_max_s
    assert hybrid.weight_bytes_max - group.weight_bytes_max == 384
    assert hybrid.expert_mem_max == group.expert_mem_max
    # Twins are 2 apart and a node holds 2 GPUs: the all-reduce crosses nodes (50 GB/s).
    assert hybrid.comm_s - group.comm_s == pytest.approx(384 / 50e9)
    assert simulate_fssdp(loads, SimConfig(gpus=4, fssdp_shard=4, **base)) == simulate_fssdp(loads, SimConfig(gpus=4, **base))


def _ep_bytes_worker(num_experts: int, k: int, d_model: int, tokens: int) -> None:
    import torch

    from moe.experts import ExpertsConfig
    from moe.layer import MoELayer
    from moe.routers import RouterContext
    from moe.routers.topk import TopKConfig
    from parallel import ParallelConfig, apply_parallel, setup_runtime
    from tools.simulate_parallel import ep_token_bytes

    rt = setup_runtime(ParallelConfig(mode="ep", ep_size=2, timeout_s=60))
    torch.manual_seed(0)  # the same layer and the same tokens on both ranks: one load distribution
    layer = MoELayer(d_model, 16, num_experts, TopKConfig(k=k), ExpertsConfig(backend="torch"))
    x = torch.randn(tokens, d_model, requires_grad=True)  # as inside a model: the dispatch backward runs too
    layer = apply_parallel(layer, ParallelConfig(mode="ep", ep_size=2, timeout_s=60), rt)
    y, aux = layer(x, RouterContext())
    (y.square().sum() + sum(aux.values())).backward()
    rt.before_optimizer_step(layer)
    m = rt.comm_metrics()
    counts = layer.stats.raw()[0]["counts_E"].tolist()
    p_E = [c / sum(counts) for c in counts]
    share0 = sum(p_E[: num_experts // 2])  # rank 0's experts' share of the slots
    assert abs(share0 - 0.5) > 0.02, share0  # unbalanced (natural routing): the bytes must follow the loads
    cfg = SimConfig(gpus=2, gpus_per_node=2, num_experts=num_experts, k=k, d_model=d_model, tokens_per_gpu=tokens, bytes_per_elem=4)
    sent, recv = ep_token_bytes(p_E, cfg)[rt.rank]
    assert m["comm/ep_a2a_tokens_bytes_sent"] + m["comm/ep_a2a_tokens_bwd_bytes_sent"] == pytest.approx(sent)
    assert m["comm/ep_a2a_tokens_bytes_recv"] + m["comm/ep_a2a_tokens_bwd_bytes_recv"] == pytest.approx(recv)


def test_ep_token_bytes_equal_the_measured_counters_on_two_ranks() -> None:
    """``ep_token_bytes`` (what tools.bench.step_parallel adds per MoE layer) against ``comm/ep_a2a_tokens*``
    measured on 2 gloo ranks for one layer step: equal, sent and received, on each rank."""
    from tests.parallel.dist_harness import run_distributed

    run_distributed(_ep_bytes_worker, 2, 8, 2, 32, 64)
