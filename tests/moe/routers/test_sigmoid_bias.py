"""DeepSeek-V3 sigmoid + bias router: unbiased weights, bias updates, group limit, sequence loss."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.sigmoid_bias import SigmoidBiasConfig, SigmoidBiasRouter
from tests.moe.routers.naive_layer import check_layer_matches_naive

D, E = 8, 8


def make(**overrides: object) -> SigmoidBiasRouter:
    torch.manual_seed(0)
    overrides.setdefault("seq_aux_loss_coef", 0.0)
    return SigmoidBiasRouter(SigmoidBiasConfig(**overrides), d_model=D, num_experts=E)


def dense(decision) -> torch.Tensor:
    T = decision.expert_ids_TK.shape[0]
    return torch.zeros(T, E).scatter(1, decision.expert_ids_TK, decision.weights_TK.detach())


def test_bias_changes_selection_never_weights() -> None:
    router = make(k=2, route_scale=2.5)
    x_TD = torch.randn(200, D)
    plain = router(x_TD, RouterContext())
    router.expert_bias_E.copy_(torch.randn(E) * 0.3)
    biased = router(x_TD, RouterContext())
    s_TE = torch.sigmoid(x_TD @ router.gate.weight.detach().t())
    sel_plain, sel_biased = dense(plain) > 0, dense(biased) > 0
    same = (sel_plain == sel_biased).all(dim=1)
    assert 0 < int(same.sum()) < 200  # the bias moved some selections, not all
    # Same selected experts => identical weights; any selection => s_sel / sum(s_sel) * route_scale.
    assert torch.equal(dense(plain)[same], dense(biased)[same])
    expected = s_TE * sel_biased / (s_TE * sel_biased).sum(dim=1, keepdim=True) * 2.5
    torch.testing.assert_close(dense(biased), expected)
    # The selection is TopK(s + b).
    expected_ids = torch.topk(s_TE + router.expert_bias_E, 2, dim=1).indices
    assert torch.equal(torch.sort(biased.expert_ids_TK, dim=1).values, torch.sort(expected_ids, dim=1).values)


def test_bias_update_rule() -> None:
    router = make(bias_update_rate=0.01)
    router.load_counts_E.copy_(torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5]))
    router.after_step(0, experts=None)
    assert torch.equal(router.expert_bias_E, torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(router.load_counts_E, torch.zeros(E))
    router.after_step(1, experts=None)  # no forward in between: nothing to balance
    assert torch.equal(router.expert_bias_E, torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))


def test_loads_counted_in_training_only() -> None:
    router = make(k=2)
    x_TD = torch.randn(30, D)
    router.eval()(x_TD, RouterContext(training=False))
    assert router.load_counts_E.sum() == 0
    d1 = router.train()(x_TD, RouterContext())
    d2 = router(x_TD, RouterContext())
    expected = torch.bincount(torch.cat([d1.expert_ids_TK, d2.expert_ids_TK]).reshape(-1), minlength=E).float()
    assert torch.equal(router.load_counts_E, expected) and router.load_counts_E.sum() == 120


def max_violation(router: SigmoidBiasRouter, x_TD: torch.Tensor) -> float:
    counts = torch.bincount(router(x_TD, RouterContext()).expert_ids_TK.reshape(-1), minlength=E).float()
    return float(counts.max() / counts.mean() - 1)


def test_iterated_updates_reduce_max_load_violation() -> None:
    router = make(k=2, bias_update_rate=0.003).train()
    torch.manual_seed(1)
    x_TD = torch.randn(512, D) + 1.0
    with torch.no_grad():  # skew: every token has logit +4 on experts 0 and 1
        router.gate.weight[:2] += 0.5
    start = max_violation(router, x_TD)
    router.load_counts_E.zero_()
    for step in range(300):
        router(x_TD, RouterContext())
        router.after_step(step, experts=None)
    end = max_violation(router, x_TD)
    assert start > 2.5  # experts 0 and 1 take almost every token: close to 4x the mean load
    assert end < 0.2  # the sign update keeps oscillating by about one gamma; measured 0.03 to 0.13


def test_group_limited_routing_stays_in_best_groups() -> None:
    router = make(k=3, n_groups=4, topk_groups=2)
    router.expert_bias_E.copy_(torch.randn(E) * 0.1)
    x_TD = torch.randn(64, D)
    decision = router(x_TD, RouterContext())
    biased_TE = torch.sigmoid(x_TD @ router.gate.weight.detach().t()) + router.expert_bias_E
    for t in range(64):
        groups = biased_TE[t].view(4, 2)
        group_score = groups.sum(dim=1)  # top-2 of a 2-expert group is the whole group
        best = set(torch.topk(group_score, 2).indices.tolist())
        chosen_groups = {int(e) // 2 for e in decision.expert_ids_TK[t]}
        assert chosen_groups <= best
        eligible = torch.cat([biased_TE[t, 2 * g : 2 * g + 2] for g in sorted(best)])
        assert sorted(biased_TE[t, decision.expert_ids_TK[t]].tolist()) == sorted(torch.topk(eligible, 3).values.tolist())


def naive_sequence_loss(s_TE: torch.Tensor, ids_TK: torch.Tensor, B: int, S: int, k: int) -> float:
    total = 0.0
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        for i in range(E):
            f = E / (k * S) * sum(int(i in ids_TK[t].tolist()) for t in rows)
            P = sum(float(s_TE[t, i] / s_TE[t].sum()) for t in rows) / S
            total += f * P
    return total / B


def test_sequence_balance_loss_matches_definition() -> None:
    router = make(k=2, seq_aux_loss_coef=0.5)
    x_TD = torch.randn(3 * 5, D)
    decision = router(x_TD, RouterContext(batch_size=3, seq_len=5))
    s_TE = torch.sigmoid(x_TD @ router.gate.weight.detach().t())
    expected = 0.5 * naive_sequence_loss(s_TE, decision.expert_ids_TK, 3, 5, 2)
    assert float(decision.aux_losses["seq_aux_loss"].detach()) == pytest.approx(expected, rel=1e-5)
    # Uniform affinities give exactly alpha (sum_i f_i / E = 1).
    torch.nn.init.zeros_(router.gate.weight)
    uniform = router(x_TD, RouterContext(batch_size=3, seq_len=5)).aux_losses["seq_aux_loss"]
    assert float(uniform.detach()) == pytest.approx(0.5, rel=1e-6)


def test_sequence_loss_needs_batch_layout() -> None:
    router = make(seq_aux_loss_coef=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        router(torch.randn(4, D), RouterContext())


def test_bias_is_checkpointed_counts_are_not() -> None:
    state = make().state_dict()
    assert "expert_bias_E" in state and "load_counts_E" not in state


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"k": 0}, "router.k"),
        ({"route_scale": 0.0}, "router.route_scale"),
        ({"bias_update_rate": -1.0}, "router.bias_update_rate"),
        ({"n_groups": 2, "topk_groups": 3}, "router.topk_groups"),
        ({"seq_aux_loss_coef": -1.0}, "router.seq_aux_loss_coef"),
    ],
)
def test_config_validation(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SigmoidBiasConfig(**overrides)


def test_shape_validation_against_num_experts() -> None:
    with pytest.raises(ConfigError, match=r"router\.n_groups"):
        SigmoidBiasRouter(SigmoidBiasConfig(n_groups=3), d_model=D, num_experts=E)
    with pytest.raises(ConfigError, match=r"router\.k"):
        SigmoidBiasRouter(SigmoidBiasConfig(k=5, n_groups=4, topk_groups=2), d_model=D, num_experts=E)


def test_layer_matches_naive_loop() -> None:
    cfg = SigmoidBiasConfig(k=2, route_scale=2.5, seq_aux_loss_coef=0.01, n_groups=2, topk_groups=1)
    check_layer_matches_naive(cfg, RouterContext(batch_size=2, seq_len=8), num_experts=4)
