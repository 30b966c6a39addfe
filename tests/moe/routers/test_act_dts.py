"""Activation DTS gate: identity = DTS bit for bit, (β, τ) symmetry broken by tanh, σ placement."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.act_dts import ActDTSConfig, ActivationDTSRouter
from moe.routers.dts import DTSConfig, DTSRouter
from tests.moe.routers.naive_layer import check_layer_matches_naive

D, E = 6, 8
SHARED = {"tau_max": 1.5, "tau_min": 0.3, "decay_steps": 20, "threshold": 0.02, "aux_loss_coef": 0.01}


@pytest.mark.parametrize(("step", "hard_step"), [(3, None), (40, 30)])
def test_identity_reproduces_dts_bit_for_bit(step: int, hard_step: int | None) -> None:
    torch.manual_seed(0)
    ref = DTSRouter(DTSConfig(hard_step=hard_step, k=2, **SHARED), d_model=D, num_experts=E).train()
    torch.manual_seed(0)
    act = ActivationDTSRouter(ActDTSConfig(activation="identity", hard_step=hard_step, k=2, **SHARED), d_model=D, num_experts=E).train()
    assert torch.equal(ref.gate.weight, act.gate.weight)
    x_TD = torch.randn(50, D)
    torch.manual_seed(1)
    a = ref(x_TD, RouterContext(step=step))
    torch.manual_seed(1)
    b = act(x_TD, RouterContext(step=step))
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.weights_TK, b.weights_TK)
    assert (a.mask_TK is None and b.mask_TK is None) or torch.equal(a.mask_TK, b.mask_TK)
    assert torch.equal(a.aux_losses["aux_loss"], b.aux_losses["aux_loss"])
    assert a.extras == b.extras


def gate_weights(activation: str, scale: float, tau: float, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """The router's dense eval-mode gate ``mask ⊙ softmax(σ(scale·h)/τ)`` with θ = 0 (every expert kept)."""
    cfg = ActDTSConfig(activation=activation, tau_max=tau, tau_min=tau, threshold=0.0, hard_step=None, gumbel_weights=True)
    router = ActivationDTSRouter(cfg, d_model=D, num_experts=E).eval()
    with torch.no_grad():
        router.gate.weight.copy_(scale * w_ED)
    decision = router(x_TD, RouterContext(step=0, training=False))
    assert decision.mask_TK.all()
    return decision.weights_TK


def test_tanh_breaks_the_beta_tau_symmetry_identity_keeps_it() -> None:
    torch.manual_seed(0)
    x_TD, w_ED = torch.randn(64, D), torch.randn(E, D) * 0.5
    same = gate_weights("identity", 1.0, 0.5, x_TD, w_ED)
    torch.testing.assert_close(gate_weights("identity", 3.0, 1.5, x_TD, w_ED), same, rtol=1e-5, atol=1e-6)
    tanh_1 = gate_weights("tanh", 1.0, 0.5, x_TD, w_ED)
    tanh_3 = gate_weights("tanh", 3.0, 1.5, x_TD, w_ED)
    assert (tanh_1 - tanh_3).abs().max() > 0.05
    # And the tanh gate is the paper's softmax(tanh(h)/τ), computed here from the definition.
    torch.testing.assert_close(tanh_1, torch.softmax(torch.tanh(x_TD @ w_ED.t()) / 0.5, dim=-1))


@pytest.mark.parametrize(("activation", "fn"), [("sigmoid", torch.sigmoid), ("tanh", torch.tanh)])
def test_default_weights_are_softmax_of_activated_logits(activation: str, fn) -> None:
    torch.manual_seed(0)
    router = ActivationDTSRouter(ActDTSConfig(activation=activation, hard_step=None), d_model=D, num_experts=E).eval()
    x_TD = torch.randn(20, D)
    decision = router(x_TD, RouterContext(step=0, training=False))
    a_TE = fn(x_TD @ router.gate.weight.detach().t())
    expected_mask = torch.softmax(a_TE / 2.0, dim=-1) > 0.001  # tau_max = 2 at step 0
    assert torch.equal(decision.mask_TK, expected_mask)
    torch.testing.assert_close(decision.weights_TK, torch.softmax(a_TE, dim=-1) * expected_mask)


def test_bias_sits_inside_the_activation() -> None:
    torch.manual_seed(0)
    cfg = ActDTSConfig(activation="tanh", bias=True, hard_step=0, k=1)
    router = ActivationDTSRouter(cfg, d_model=D, num_experts=E).eval()
    assert router.gate.bias is not None and torch.equal(router.gate.bias, torch.zeros(E))
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.linspace(-2.0, 3.0, E))
    decision = router(torch.randn(4, D), RouterContext(step=0, training=False))
    a_E = torch.tanh(torch.linspace(-2.0, 3.0, E))
    assert (decision.expert_ids_TK == E - 1).all()
    torch.testing.assert_close(decision.weights_TK[:, 0], torch.softmax(a_E, dim=0)[-1].expand(4))


def test_unknown_activation_refused() -> None:
    with pytest.raises(ConfigError, match=r"router\.activation"):
        ActDTSConfig(activation="relu")
    with pytest.raises(ConfigError, match=r"router\.threshold"):
        ActivationDTSRouter(ActDTSConfig(threshold=0.5), d_model=D, num_experts=E)


def test_layer_matches_naive_loop() -> None:
    cfg = ActDTSConfig(activation="tanh", tau_max=0.1, tau_min=0.1, threshold=0.05, hard_step=None, bias=True)
    _, decision = check_layer_matches_naive(cfg, RouterContext(step=0, batch_size=2, seq_len=8), num_experts=4)
    assert decision.num_slots == 4
