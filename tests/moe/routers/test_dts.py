"""EvoMoE DTS gate: schedule values, threshold mask, hard switch, aux loss, validation, layer."""

from __future__ import annotations

import math

import pytest
import torch

import moe.routers.dts as dts
from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.dts import DTSConfig, DTSRouter, temperature
from tests.moe.routers.naive_layer import check_layer_matches_naive

D, E = 6, 8


def make_router(**overrides: object) -> DTSRouter:
    torch.manual_seed(0)
    return DTSRouter(DTSConfig(**overrides), d_model=D, num_experts=E)


def logits_of(router: DTSRouter, x_TD: torch.Tensor) -> torch.Tensor:
    return x_TD @ router.gate.weight.detach().t()


def fix_noise(monkeypatch: pytest.MonkeyPatch, g_TE: torch.Tensor) -> None:
    monkeypatch.setattr(dts, "gumbel_noise", lambda like_TE: g_TE.clone())


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 2.0), (50, 1.25), (100, 0.5), (150, 0.5), (10_000, 0.5)]
)
def test_linear_schedule(step: int, expected: float) -> None:
    assert temperature(step, "linear", 2.0, 0.5, 100) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 2.0), (25, math.sqrt(2.0)), (50, 1.0), (100, 0.5), (250, 0.5)]
)
def test_exponential_schedule(step: int, expected: float) -> None:
    # 2 * (0.5/2)^(s/100): s=50 -> 2*0.5 = 1, s=25 -> 2*0.25^0.25 = sqrt(2).
    assert temperature(step, "exponential", 2.0, 0.5, 100) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("step", "expected"), [(0, 10.0), (500, 5.005), (1000, 0.01), (5000, 0.01)])
def test_router_reports_temperature_of_its_step(step: int, expected: float) -> None:
    router = make_router(tau_max=10.0, tau_min=0.01, decay_steps=1000, hard_step=None)
    decision = router(torch.randn(4, D), RouterContext(step=step))
    assert decision.extras["temperature"] == pytest.approx(expected, rel=1e-12)
    assert decision.extras["threshold"] == 0.001


def test_zero_gate_high_temperature_activates_every_expert() -> None:
    router = make_router(tau_max=1e3, tau_min=1e3, hard_step=None)
    torch.nn.init.zeros_(router.gate.weight)
    decision = router.train()(torch.randn(64, D), RouterContext(step=0))
    assert decision.num_slots == E
    assert decision.mask_TK.all()
    torch.testing.assert_close(decision.weights_TK, torch.full((64, E), 1.0 / E))


def test_soft_phase_mask_and_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    T, tau, theta = 32, 0.3, 0.05
    router = make_router(tau_max=tau, tau_min=tau, threshold=theta, hard_step=None).train()
    x_TD, g_TE = torch.randn(T, D), torch.randn(T, E)
    fix_noise(monkeypatch, g_TE)
    decision = router(x_TD, RouterContext(step=3))
    h_TE = logits_of(router, x_TD)
    expected_mask = torch.softmax((h_TE + g_TE) / tau, dim=-1) > theta
    assert torch.equal(decision.mask_TK, expected_mask)
    assert torch.equal(decision.expert_ids_TK, torch.arange(E).expand(T, E))
    # Variable experts per token, and the kept mass is not renormalised.
    per_token = expected_mask.sum(dim=1)
    assert per_token.min() >= 1 and per_token.max() > per_token.min()
    torch.testing.assert_close(decision.weights_TK, torch.softmax(h_TE, dim=-1) * expected_mask)
    assert (decision.weights_TK.sum(dim=1) < 1 - 1e-6).any()


def test_gumbel_weights_use_noisy_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    T, tau = 16, 0.7
    router = make_router(tau_max=tau, tau_min=tau, hard_step=None, gumbel_weights=True).train()
    x_TD, g_TE = torch.randn(T, D), torch.randn(T, E)
    fix_noise(monkeypatch, g_TE)
    decision = router(x_TD, RouterContext(step=0))
    ghat_TE = torch.softmax((logits_of(router, x_TD) + g_TE) / tau, dim=-1)
    torch.testing.assert_close(decision.weights_TK, ghat_TE * (ghat_TE > 0.001))


@pytest.mark.parametrize("k", [1, 2])
def test_hard_switch_keeps_topk_of_noisy_scores(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    T = 40
    router = make_router(k=k, hard_step=10).train()
    x_TD, g_TE = torch.randn(T, D), torch.randn(T, E) * 3
    fix_noise(monkeypatch, g_TE)
    decision = router(x_TD, RouterContext(step=10))
    h_TE = logits_of(router, x_TD)
    assert decision.num_slots == k and decision.mask_TK is None
    expected_ids = torch.topk(h_TE + g_TE, k, dim=-1).indices
    assert torch.equal(decision.expert_ids_TK, expected_ids)
    dense_TE = torch.zeros(T, E).scatter(1, decision.expert_ids_TK, decision.weights_TK)
    assert ((dense_TE > 0).sum(dim=1) == k).all()
    # The noise moves the choice away from argmax h for some tokens: the test sees the noise.
    assert not torch.equal(expected_ids[:, 0], h_TE.argmax(dim=-1))
    torch.testing.assert_close(decision.weights_TK, torch.softmax(h_TE, dim=-1).gather(1, expected_ids))


def test_hard_switch_respects_step() -> None:
    router = make_router(hard_step=100)
    assert router(torch.randn(5, D), RouterContext(step=99)).num_slots == E
    assert router(torch.randn(5, D), RouterContext(step=100)).num_slots == 1


def test_eval_has_no_noise() -> None:
    T, tau = 24, 0.4
    router = make_router(tau_max=tau, tau_min=tau, threshold=0.01, hard_step=None).eval()
    x_TD = torch.randn(T, D)
    decision = router(x_TD, RouterContext(step=0, training=False))
    expected_mask = torch.softmax(logits_of(router, x_TD) / tau, dim=-1) > 0.01
    assert torch.equal(decision.mask_TK, expected_mask)


def test_no_token_without_expert_at_tiny_temperature() -> None:
    router = make_router(tau_max=1e-4, tau_min=1e-4, threshold=0.1, hard_step=None).train()
    decision = router(torch.randn(256, D) * 10, RouterContext(step=0))
    assert (decision.mask_TK.sum(dim=1) >= 1).all()


def test_aux_loss_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dense uniform routing: m_e = 1/E, c_e = 1, so E^2 * mean_e(m_e c_e) = E.
    router = make_router(tau_max=1e3, tau_min=1e3, hard_step=None, aux_loss_coef=0.5)
    torch.nn.init.zeros_(router.gate.weight)
    aux = router(torch.randn(10, D), RouterContext(step=0)).aux_losses["aux_loss"]
    assert float(aux.detach()) == pytest.approx(0.5 * E, rel=1e-5)
    # Hard top-1: recompute m_e and c_e from the definition.
    router = make_router(hard_step=0, aux_loss_coef=1.0).train()
    x_TD, g_TE = torch.randn(30, D), torch.randn(30, E)
    fix_noise(monkeypatch, g_TE)
    aux = router(x_TD, RouterContext(step=0)).aux_losses["aux_loss"]
    h_TE = logits_of(router, x_TD)
    choice_T = (h_TE + g_TE).argmax(dim=-1)
    p_TE = torch.softmax(h_TE, dim=-1)
    m = [float(sum(p_TE[t, e] for t in range(30) if choice_T[t] == e)) / 30 for e in range(E)]
    c = [float((choice_T == e).sum()) / 30 for e in range(E)]
    expected = E * E * sum(mi * ci for mi, ci in zip(m, c)) / E
    assert float(aux.detach()) == pytest.approx(expected, rel=1e-5)


def test_gumbel_noise_moments() -> None:
    torch.manual_seed(0)
    g = dts.gumbel_noise(torch.empty(400_000, dtype=torch.float64))
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance = pi^2 / 6 = 1.6449.
    assert float(g.mean()) == pytest.approx(0.5772157, abs=0.01)
    assert float(g.var()) == pytest.approx(math.pi**2 / 6, abs=0.04)


def test_threshold_at_or_above_one_over_e_is_refused() -> None:
    for theta in (1.0 / E, 0.2):
        with pytest.raises(ConfigError, match=r"router\.threshold.*model\.num_experts"):
            DTSRouter(DTSConfig(threshold=theta), d_model=D, num_experts=E)
    DTSRouter(DTSConfig(threshold=0.99 / E), d_model=D, num_experts=E)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"schedule": "cosine"}, "router.schedule"),
        ({"tau_min": 0.0}, "router.tau_min"),
        ({"tau_max": 0.1, "tau_min": 0.5}, "router.tau_max"),
        ({"decay_steps": 0}, "router.decay_steps"),
        ({"hard_step": -1}, "router.hard_step"),
        ({"k": 0}, "router.k"),
        ({"threshold": -0.1}, "router.threshold"),
    ],
)
def test_config_validation(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DTSConfig(**overrides)


def test_k_above_num_experts_refused() -> None:
    with pytest.raises(ConfigError, match=r"router\.k"):
        DTSRouter(DTSConfig(k=E + 1), d_model=D, num_experts=E)


def test_layer_soft_phase_matches_naive_loop() -> None:
    cfg = DTSConfig(tau_max=0.5, tau_min=0.5, threshold=0.05, hard_step=None)
    _, decision = check_layer_matches_naive(cfg, RouterContext(step=0, batch_size=2, seq_len=8), num_experts=4)
    assert decision.num_slots == 4 and 1 <= int(decision.mask_TK.sum(1).min()) < int(decision.mask_TK.sum(1).max())


def test_layer_hard_phase_matches_naive_loop() -> None:
    cfg = DTSConfig(k=2, hard_step=0, gumbel_weights=True)
    _, decision = check_layer_matches_naive(cfg, RouterContext(step=5, batch_size=2, seq_len=8), num_experts=4)
    assert decision.num_slots == 2
