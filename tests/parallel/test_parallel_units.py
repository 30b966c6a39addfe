"""Single-process checks: layout validation, FSSDP planning (hand-computed), byte meter, exchange."""

from __future__ import annotations

import pytest
import torch

from moe.dispatch import dispatch
from moe.errors import ConfigError, SetupError
from moe.experts import Experts
from moe.layer import local_runner
from moe.routers import RoutingDecision
from parallel import ParallelConfig
from parallel.comm import CommMeter
from parallel.config import FSSDPConfig
from parallel.modes import check_config, check_experts, check_world
from parallel.fssdp_plan import heterogeneous_shard, hottest, initial_owners, plan_digest, sparse_materialize
from parallel.mesh import init_mesh, torchrun_env
from parallel.token_exchange import exchange_and_run


def test_bad_layouts_are_refused_naming_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"parallel.mode \('tp'\) must be one of"):
        check_config(ParallelConfig(mode="tp"))
    with pytest.raises(ConfigError, match=r"parallel.dense \('zero3'\)"):
        check_config(ParallelConfig(mode="ep", dense="zero3"))
    with pytest.raises(ConfigError, match=r"parallel.ep_size \(2\) is only used by parallel.mode=ep"):
        check_config(ParallelConfig(mode="ddp", ep_size=2))
    with pytest.raises(ConfigError, match=r"parallel.ep_size \(3\) must divide the world size \(4\)"):
        check_world(ParallelConfig(mode="ep", ep_size=3), 4)
    with pytest.raises(ConfigError, match=r"parallel.ep_size \(8\) must be <= the world size \(4\)"):
        check_world(ParallelConfig(mode="ep", ep_size=8), 4)
    with pytest.raises(ConfigError, match=r"parallel.ep_size \(4\) must divide model.num_experts \(6\)"):
        check_experts(ParallelConfig(mode="ep"), 4, 6)
    with pytest.raises(ConfigError, match=r"parallel.fssdp.window \(0\)"):
        FSSDPConfig(window=0)
    with pytest.raises(ConfigError, match=r"parallel.fssdp.shard_size \(3\) must divide the world size \(4\)"):
        check_world(ParallelConfig(mode="fssdp", fssdp=dict(shard_size=3)), 4)
    with pytest.raises(ConfigError, match=r"parallel.fssdp.shard_size \(2\) is only used by parallel.mode=fssdp"):
        check_config(ParallelConfig(mode="ep", fssdp=dict(shard_size=2)))
    check_world(ParallelConfig(mode="fssdp", fssdp=dict(shard_size=2)), 4)
    check_world(ParallelConfig(mode="ep", ep_size=2), 4)  # valid layouts pass
    check_experts(ParallelConfig(mode="ep", ep_size=2), 4, 6)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SetupError, match="WORLD_SIZE is 2"):
        init_mesh(ParallelConfig(mode="none"))
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SetupError, match="RANK=3 WORLD_SIZE=2"):
        torchrun_env()


def test_plan_helpers_hand_computed() -> None:
    assert hottest([3, 5, 5, 1], 2) == [1, 2]  # ties by lower id
    assert initial_owners(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert initial_owners(2, 4) == [0, 2]
    a = plan_digest([[0, 1]], [[[0], [0, 1]]])
    assert a == plan_digest([[0, 1]], [[[0], [0, 1]]]) and a != plan_digest([[0, 1]], [[[0, 1], [1]]])


def test_algorithm1_hot_experts_everywhere_when_t_le_m() -> None:
    # t=2 <= m=2: the two hottest (0 and 2) go to every rank; the others stay with their owner.
    assert sparse_materialize([0, 0, 1, 1], [10, 0, 5, 1], t=2, m=2, world=2, ranks_per_node=2) == [[0, 1], [0], [0, 1], [1]]


def test_algorithm1_slots_by_load_nodes_lacking_first() -> None:
    # W=4 on 2 nodes {0,1},{2,3}; t=2 > m=1: 4 extra slots, expert 0 gets round(4*6/8)=3, expert 1
    # round(4*2/8)=1. Expert 0 (owner 0): first a rank on node 1 (lacks it): 2, then 1, then 3.
    # Expert 1 (owner 1): the only rank with a free slot left is 0.
    got = sparse_materialize([0, 1, 2, 3], [6, 2, 0, 0], t=2, m=1, world=4, ranks_per_node=2)
    assert got == [[0, 1, 2, 3], [0, 1], [2], [3]]


def test_algorithm2_balanced_slots_cold_first_hot_last() -> None:
    # L=2, E=2, W=2 (one rank per node), t=1: hot = expert 0 of layer 0, expert 1 of layer 1.
    # Layer 0 first (max load 5): cold e1 -> rank 0 (tie, lower id); layer 1: cold e0 -> rank 1
    # (lower node load). Hot ones fill the remaining slot of each rank.
    assert heterogeneous_shard([[5, 1], [3, 4]], t=1, world=2, ranks_per_node=1) == [[0, 0], [1, 1]]
    # Each rank owns exactly L*E/W experts whatever the loads (memory balance).
    owner = heterogeneous_shard([[9, 0, 0, 7], [1, 1, 8, 0], [0, 3, 3, 3]], t=1, world=4, ranks_per_node=2)
    flat = [d for row in owner for d in row]
    assert sorted(flat.count(d) for d in range(4)) == [3, 3, 3, 3]


def test_comm_meter_reports_and_resets() -> None:
    m = CommMeter()
    m.add("spag", 100, 40)
    m.add("spag", 20, 0)
    m.add("a2a", 5, 7)
    assert m.pop() == {
        "comm/a2a_bytes_sent": 5.0, "comm/a2a_bytes_recv": 7.0, "comm/spag_bytes_sent": 120.0, "comm/spag_bytes_recv": 40.0,
        "comm/total_bytes_sent": 125.0, "comm/total_bytes_recv": 47.0,
    }
    assert m.pop() == {}


def test_exchange_in_one_process_equals_local_runner() -> None:
    """The destination-sort / expert-sort permutations are exact inverses (world of one)."""
    torch.manual_seed(0)
    T, E, K, D = 10, 4, 2, 8
    experts = Experts(E, D, 12)
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.randint(0, E, (T, K))
    plan = dispatch(RoutingDecision(expert_ids_TK=ids, weights_TK=torch.rand(T, K), probs_TE=torch.rand(T, E)), E)
    want = local_runner(experts, x, plan)
    rows = x.index_select(0, plan.token_idx_R)
    got_rows = exchange_and_run(rows, plan.counts_E.unsqueeze(0), torch.arange(E), experts.grouped_swiglu, None, None, dest_sorted=False)
    torch.testing.assert_close(got_rows, experts.grouped_swiglu(rows, plan.counts_E))
    from moe.dispatch import combine

    torch.testing.assert_close(combine(got_rows, plan, T), want)


def test_device_choice_from_moeforge_device(monkeypatch):
    """MOEFORGE_DEVICE=cpu keeps ranks on the CPU whatever the machine has; a bad value and a
    node with more ranks than GPUs are refused with a message naming the fix."""
    from parallel.mesh import use_cuda

    monkeypatch.setenv("MOEFORGE_DEVICE", "cpu")
    assert use_cuda(4) is False
    monkeypatch.setenv("MOEFORGE_DEVICE", "gpu")
    with pytest.raises(SetupError, match=r"MOEFORGE_DEVICE \('gpu'\) must be auto, cpu or cuda"):
        use_cuda(1)
    monkeypatch.setenv("MOEFORGE_DEVICE", "auto")
    if torch.cuda.is_available():
        with pytest.raises(SetupError, match="ranks on this node but"):
            use_cuda(torch.cuda.device_count() + 1)
    else:
        assert use_cuda(2) is False
        monkeypatch.setenv("MOEFORGE_DEVICE", "cuda")
        with pytest.raises(SetupError, match="sees no CUDA device"):
            use_cuda(1)
