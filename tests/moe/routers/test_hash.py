"""Hash routing: fixed seeded table, determinism, balance on uniform ids, modulo wrap, layer."""

from __future__ import annotations

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import RouterContext
from moe.routers.hash import HashConfig, HashRouter
from tests.moe.routers.naive_layer import check_layer_matches_naive

D, E = 4, 8


def route(router: HashRouter, ids_T: torch.Tensor):
    return router(torch.randn(ids_T.shape[0], D), RouterContext(token_ids_T=ids_T))


def test_deterministic_in_the_seed() -> None:
    ids_T = torch.randint(0, 70_000, (500,), generator=torch.Generator().manual_seed(3))
    a, b = HashRouter(HashConfig(seed=1), D, E), HashRouter(HashConfig(seed=1), D, E)
    c = HashRouter(HashConfig(seed=2), D, E)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    first = route(a, ids_T).expert_ids_TK
    assert torch.equal(first, route(a, ids_T).expert_ids_TK)  # and independent of x
    assert torch.equal(first, route(b, ids_T).expert_ids_TK)


def test_table_is_balanced() -> None:
    counts = torch.bincount(HashRouter(HashConfig(table_size=1003), D, E).table, minlength=E)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 1003


def test_uniform_ids_are_balanced_within_tolerance() -> None:
    T = 8192
    ids_T = torch.randint(0, 50_000, (T,), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(route(HashRouter(HashConfig(), D, E), ids_T).expert_ids_TK[:, 0], minlength=E)
    # Multinomial std per expert is sqrt(T/E * (1 - 1/E)) ~ 30; allow 5 std (150 of 1024, ~15%).
    assert (counts - T / E).abs().max() < 150


def test_ids_wrap_modulo_table_size() -> None:
    router = HashRouter(HashConfig(table_size=100), D, E)
    ids = route(router, torch.tensor([5, 105, 205, 7])).expert_ids_TK[:, 0]
    assert ids[0] == ids[1] == ids[2] == router.table[5] and ids[3] == router.table[7]


def test_weight_one_one_hot_probs_no_parameters() -> None:
    router = HashRouter(HashConfig(), D, E)
    decision = route(router, torch.arange(20))
    assert list(router.parameters()) == []
    assert decision.num_slots == 1 and torch.equal(decision.weights_TK, torch.ones(20, 1))
    assert torch.equal(decision.probs_TE, torch.nn.functional.one_hot(router.table[:20], E).float())
    assert "table" in router.state_dict()


def test_missing_token_ids_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="token_ids_T"):
        HashRouter(HashConfig(), D, E)(torch.randn(3, D), RouterContext())
    with pytest.raises(ConfigError, match=r"router\.table_size"):
        HashConfig(table_size=0)


def test_layer_matches_naive_loop() -> None:
    ids_T = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1))
    _, decision = check_layer_matches_naive(HashConfig(), RouterContext(token_ids_T=ids_T, batch_size=2, seq_len=8), num_experts=4)
    assert torch.equal(decision.expert_ids_TK[:, 0], HashRouter(HashConfig(), 8, 4).table[ids_T])
