"""Expert-choice routing: exactly C tokens per expert, softmax weights, non-causality, layer."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter, expert_capacity
from tests.moe.routers.naive_layer import check_layer_matches_naive

D, E = 6, 4


@pytest.mark.parametrize(("T", "c", "expected"), [(10, 2.0, 5), (16, 1.0, 4), (17, 1.0, 5), (6, 8.0, 6)])
def test_capacity_formula(T: int, c: float, expected: int) -> None:
    assert expert_capacity(T, E, c) == expected  # ceil(T*c/E), at most T


@pytest.mark.parametrize(("T", "c"), [(10, 2.0), (33, 1.0), (8, 0.5)])
def test_every_expert_takes_exactly_c_tokens(T: int, c: float) -> None:
    torch.manual_seed(0)
    router = ExpertChoiceRouter(ExpertChoiceConfig(capacity_factor=c), d_model=D, num_experts=E)
    x_TD = torch.randn(T, D)
    decision = router(x_TD, RouterContext())
    C = expert_capacity(T, E, c)
    s_TE = torch.softmax(x_TD @ router.gate.weight.detach().t(), dim=-1)
    assert decision.num_slots == E and torch.equal(decision.expert_ids_TK, torch.arange(E).expand(T, E))
    assert torch.equal(decision.mask_TK.sum(dim=0), torch.full((E,), C))
    assert torch.equal((decision.weights_TK > 0).sum(dim=0), torch.full((E,), C))
    for e in range(E):  # expert e's tokens are its C highest-affinity ones
        chosen = set(torch.nonzero(decision.mask_TK[:, e]).flatten().tolist())
        assert chosen == set(torch.topk(s_TE[:, e], C).indices.tolist())
    torch.testing.assert_close(decision.weights_TK, s_TE * decision.mask_TK)
    assert decision.extras["capacity"] == C


def test_routing_of_a_token_depends_on_later_tokens() -> None:
    router = ExpertChoiceRouter(ExpertChoiceConfig(capacity_factor=1.0), d_model=2, num_experts=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    x_TD = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert bool(router(x_TD, RouterContext()).mask_TK[0, 0])  # expert 0 takes tokens 1 and 0
    x_TD[3] = torch.tensor([3.0, 0.0])  # a later token outbids token 0
    assert not bool(router(x_TD, RouterContext()).mask_TK[0, 0])


def test_causal_refused() -> None:
    with pytest.raises(ConfigError, match=r"router\.causal.*non-causal"):
        ExpertChoiceConfig(causal=True)
    with pytest.raises(ConfigError, match=r"router\.capacity_factor"):
        ExpertChoiceConfig(capacity_factor=0.0)


def test_layer_matches_naive_loop_and_unpicked_tokens_get_zero() -> None:
    cfg = ExpertChoiceConfig(capacity_factor=1.0)
    y_TD, decision = check_layer_matches_naive(cfg, RouterContext(batch_size=2, seq_len=8), num_experts=E)
    per_token = decision.valid_mask().sum(dim=1)
    assert int(per_token.min()) == 0 and int(per_token.max()) >= 2  # 0..E experts per token
    assert torch.equal(y_TD[per_token == 0], torch.zeros_like(y_TD[per_token == 0]))
    assert (y_TD[per_token > 0].abs().sum(dim=1) > 0).all()
