"""EvoMoE expert-diversify phase: base routing, masked spawn, spawn-once buffer, schedule offset."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.experts import Experts, ExpertsConfig
from moe.layer import MoELayer
from moe.routers import RouterContext
from moe.routers.dts import DTSConfig, DTSRouter
from moe.routers.evolve import EXPERT_WEIGHT_NAMES, EvolveConfig
from tests.moe.routers.naive_layer import check_layer_matches_naive

D, F, E, BASE = 16, 32, 4, 5


def make(mask_ratio: float = 0.3, seed: int = 7, **dts: object) -> tuple[DTSRouter, Experts]:
    torch.manual_seed(0)
    cfg = DTSConfig(evolve=EvolveConfig(enabled=True, base_steps=BASE, mask_ratio=mask_ratio, seed=seed), **dts)
    return DTSRouter(cfg, d_model=D, num_experts=E), Experts(E, D, F)


def snapshot(experts: Experts) -> dict[str, torch.Tensor]:
    return {n: getattr(experts, n).detach().clone() for n in EXPERT_WEIGHT_NAMES}


def test_base_phase_sends_every_token_to_expert_zero() -> None:
    router, _ = make()
    decision = router(torch.randn(10, D), RouterContext(step=2))
    assert torch.equal(decision.expert_ids_TK, torch.zeros(10, 1, dtype=torch.int64))
    assert torch.equal(decision.weights_TK, torch.ones(10, 1))
    assert torch.equal(decision.probs_TE[:, 0], torch.ones(10))


def test_spawn_happens_after_last_base_step_only() -> None:
    router, experts = make()
    before = snapshot(experts)
    router.after_step(BASE - 2, experts)
    assert not bool(router.spawned)
    assert all(torch.equal(before[n], getattr(experts, n)) for n in EXPERT_WEIGHT_NAMES)
    router.after_step(BASE - 1, experts)
    assert bool(router.spawned)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_spawned_experts_are_masked_copies_of_the_base(ratio: float) -> None:
    router, experts = make(mask_ratio=ratio)
    base = {n: w[0] for n, w in snapshot(experts).items()}
    gate_before = router.gate.weight.detach().clone()
    router.after_step(BASE - 1, experts)
    for name in EXPERT_WEIGHT_NAMES:
        w = getattr(experts, name).detach()
        n = base[name].numel()
        tol = 5 * (ratio * (1 - ratio) / n) ** 0.5  # 5 binomial standard deviations
        for e in range(E):
            kept = w[e] != 0
            # Every kept entry is the base weight exactly; the rest is zero.
            assert torch.equal(w[e][kept], base[name][kept])
            assert abs((1 - kept.float().mean().item()) - ratio) < tol, (name, e)
        # Masks differ between experts.
        assert not torch.equal(w[1] != 0, w[2] != 0)
    assert not torch.equal(router.gate.weight, gate_before)


def test_spawn_is_deterministic_in_the_seed() -> None:
    results = []
    for seed in (7, 7, 8):
        router, experts = make(seed=seed)
        router.after_step(BASE - 1, experts)
        results.append((snapshot(experts), router.gate.weight.detach().clone()))
    (a, ga), (b, gb), (c, gc) = results
    assert all(torch.equal(a[n], b[n]) for n in a) and torch.equal(ga, gb)
    assert not torch.equal(a["w_up_EDF"], c["w_up_EDF"]) and not torch.equal(ga, gc)


def test_spawned_buffer_prevents_a_second_spawn() -> None:
    router, experts = make()
    router.after_step(BASE - 1, experts)
    after_first = snapshot(experts)
    gate = router.gate.weight.detach().clone()
    for step in (BASE - 1, BASE, BASE + 10):
        router.after_step(step, experts)
    assert all(torch.equal(after_first[n], getattr(experts, n)) for n in EXPERT_WEIGHT_NAMES)
    assert torch.equal(router.gate.weight, gate)


def test_state_dict_round_trip_keeps_spawned() -> None:
    torch.manual_seed(0)
    cfg = DTSConfig(evolve=EvolveConfig(enabled=True, base_steps=BASE))
    layer = MoELayer(D, F, E, cfg, ExpertsConfig())
    layer.after_step(BASE - 1)
    state = layer.state_dict()
    assert "router.spawned" in state and bool(state["router.spawned"])
    resumed = MoELayer(D, F, E, cfg, ExpertsConfig())
    assert not bool(resumed.router.spawned)
    resumed.load_state_dict(state)
    assert bool(resumed.router.spawned)
    loaded = snapshot(resumed.experts)
    resumed.after_step(BASE - 1)  # a resumed run replaying the spawn step must not spawn again
    assert all(torch.equal(loaded[n], getattr(resumed.experts, n)) for n in EXPERT_WEIGHT_NAMES)
    assert resumed.router(torch.randn(3, D), RouterContext(step=BASE)).num_slots == E


def test_dts_schedule_counts_from_the_spawn() -> None:
    router, experts = make(tau_max=3.0, tau_min=1.0, decay_steps=10, hard_step=4)
    router.after_step(BASE - 1, experts)
    assert router(torch.randn(3, D), RouterContext(step=BASE)).extras["temperature"] == pytest.approx(3.0)
    assert router(torch.randn(3, D), RouterContext(step=BASE + 5)).extras["temperature"] == pytest.approx(2.0)
    assert router(torch.randn(3, D), RouterContext(step=BASE + 3)).num_slots == E
    assert router(torch.randn(3, D), RouterContext(step=BASE + 4)).num_slots == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"mask_ratio": 1.0}, "router.evolve.mask_ratio"), ({"base_steps": 0}, "router.evolve.base_steps"), ({"seed": -1}, "router.evolve.seed")],
)
def test_evolve_config_validation(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        EvolveConfig(**overrides)


def test_layer_base_phase_matches_naive_loop() -> None:
    cfg = DTSConfig(evolve=EvolveConfig(enabled=True, base_steps=BASE))
    _, decision = check_layer_matches_naive(cfg, RouterContext(step=0, batch_size=2, seq_len=6), num_experts=E)
    assert (decision.expert_ids_TK == 0).all()


def test_layer_after_spawn_matches_naive_loop() -> None:
    cfg = DTSConfig(evolve=EvolveConfig(enabled=True, base_steps=BASE, mask_ratio=0.25), tau_max=0.5, tau_min=0.5, threshold=0.05)
    check_layer_matches_naive(
        cfg, RouterContext(step=BASE, batch_size=2, seq_len=6), num_experts=E, prepare=lambda layer: layer.after_step(BASE - 1)
    )
