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


def test_frequency_table_hand_computed() -> None:
    from moe.routers.hash import frequency_table

    # Masses 10, 6, 5, 4, 3, 2 over 2 experts, greedy to the lighter expert:
    # 10->e0; 6->e1; 5->e1 (6<10, 11); 4->e0 (10<11, 14); 3->e1 (11<14, 14); 2: a tie at 14, e0 holds
    # fewer ids (2 vs 3) -> e0. Ids 6, 7, 8 are never seen: by fewest ids (3 each: e0 by index), e1, e0.
    counts = torch.tensor([10, 6, 5, 4, 3, 2, 0, 0, 0])
    assert frequency_table(counts, 9, 2).tolist() == [0, 1, 1, 0, 1, 0, 0, 1, 0]
    # ids sharing an entry (table_size 4 < vocab 8) pool their counts: masses 13, 8, 5, 4.
    assert frequency_table(counts, 4, 2).tolist() == [0, 1, 1, 0]


def test_frequency_balance_on_zipf_bytes_beats_random() -> None:
    """Byte-like Zipf(1.1) ids over 256 values, 8 experts. The top id alone holds ~21% of tokens
    (> 1/8), so it fills one expert; the other seven share the rest within 1%. The random table
    leaves experts far apart."""
    V = 256
    mass = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.1
    mass = mass[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    counts = (mass / mass.sum() * 1e7).round().long()
    cfg = HashConfig(table_size=V, balance="frequency")
    fitted, plain = HashRouter(cfg, D, E), HashRouter(HashConfig(table_size=V), D, E)
    fitted.fit_token_counts(counts)
    plain.fit_token_counts(counts)  # balance=random ignores counts
    assert torch.equal(plain.table, HashRouter(HashConfig(table_size=V), D, E).table)
    load = lambda r: torch.zeros(E, dtype=torch.float64).index_add_(0, r.table, counts.double())  # noqa: E731
    top = int(counts.argmax())
    others = torch.ones(E, dtype=torch.bool)
    others[fitted.table[top]] = False
    assert load(fitted)[fitted.table[top]] == counts.max()  # the top id is alone on its expert
    rest = load(fitted)[others]
    assert rest.max() / rest.min() < 1.01
    assert load(plain).max() / load(plain).min() > 2
    assert fitted.wants_token_counts == cfg.count_tokens and plain.wants_token_counts == 0


def test_bad_balance_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"router.balance \('lpt'\)"):
        HashConfig(balance="lpt")
