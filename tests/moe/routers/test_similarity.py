"""Similarity-aware routing: token-graph mixing, causal and document masks (routers.md §6)."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import ConfigError
from moe.routers import ROUTERS, RouterContext
from moe.routers.similarity import SimilarityConfig, SimilarityRouter
from moe.routers.topk import TopKConfig, TopKRouter
from tests.moe.routers.naive_layer import check_layer_matches_naive

B, S, D, E = 2, 6, 16, 8


def _router(**kw: object) -> SimilarityRouter:
    torch.manual_seed(0)
    return SimilarityRouter(SimilarityConfig(**{"tau": 0.5, **kw}), d_model=D, num_experts=E)  # type: ignore[arg-type]


def _ctx(doc_ids: torch.Tensor | None = None) -> RouterContext:
    return RouterContext(batch_size=B, seq_len=S, doc_ids_T=doc_ids)


def _reference_similarity(router: SimilarityRouter, x_TD: torch.Tensor, doc_T: torch.Tensor | None) -> torch.Tensor:
    """Entry by entry: score_ij = (A x_i).(B x_j) / (tau sqrt(d_sim)), masked softmax per row."""
    cfg = router.cfg
    a = router.sim_a.weight
    b = a if router.sim_b is None else router.sim_b.weight
    out = torch.zeros(B, S, S)
    for n in range(B):
        for i in range(S):
            scores = []
            for j in range(S):
                ti, tj = n * S + i, n * S + j
                visible = (j <= i or not cfg.causal) and (doc_T is None or doc_T[ti] == doc_T[tj])
                s = float((a @ x_TD[ti]) @ (b @ x_TD[tj])) / (cfg.tau * math.sqrt(cfg.d_sim))
                scores.append(s if visible else -math.inf)
            out[n, i] = torch.softmax(torch.tensor(scores), dim=0)
    return out


@pytest.mark.parametrize("symmetric,causal", [(True, True), (False, True), (True, False)])
def test_similarity_matches_entrywise_reference(symmetric: bool, causal: bool) -> None:
    router = _router(symmetric=symmetric, causal=causal, d_sim=4)
    x = torch.randn(B * S, D)
    doc = torch.tensor([0, 0, 1, 1, 1, 2] * B)
    with torch.no_grad():
        torch.testing.assert_close(router.similarity(x, _ctx()), _reference_similarity(router, x, None))
        torch.testing.assert_close(router.similarity(x, _ctx(doc)), _reference_similarity(router, x, doc))


def test_identity_graph_reproduces_topk_exactly() -> None:
    router = _router(k=2)
    topk = TopKRouter(TopKConfig(k=2), d_model=D, num_experts=E)
    topk.gate.weight.data.copy_(router.gate.weight.data)
    x = torch.randn(B * S, D)
    ref = topk(x, RouterContext())
    # One-token sequences: S = [[1]].
    one = router(x, RouterContext(batch_size=B * S, seq_len=1))
    # An explicit identity graph.
    router.similarity = lambda x_TD, context: torch.eye(S).expand(B, S, S)  # type: ignore[method-assign]
    eye = router(x, _ctx())
    for d in (one, eye):
        assert torch.equal(d.expert_ids_TK, ref.expert_ids_TK) and torch.equal(d.weights_TK, ref.weights_TK)
        assert torch.equal(d.probs_TE, ref.probs_TE)
        assert d.aux_losses["aux_loss"].item() == ref.aux_losses["aux_loss"].item()


@pytest.mark.parametrize("mix", ["probs", "logits"])
def test_mixed_rows_sum_to_one_and_equal_graph_times_pi(mix: str) -> None:
    router = _router(mix=mix)
    x = torch.randn(B * S, D)
    d = router(x, _ctx())
    torch.testing.assert_close(d.probs_TE.sum(dim=-1), torch.ones(B * S))
    G = router.similarity(x, _ctx()).detach()
    h = (x @ router.gate.weight.t()).detach().view(B, S, E)
    expected = G @ torch.softmax(h, -1) if mix == "probs" else torch.softmax(G @ h, -1)
    torch.testing.assert_close(d.probs_TE, expected.reshape(B * S, E))
    assert (d.weights_TK.sum(dim=-1) - 1).abs().max() < 1e-6


def test_permutation_equivariance_without_causal_mask() -> None:
    router = _router(causal=False, tau=2.0)
    x = torch.randn(B * S, D)
    perm = torch.randperm(S)
    x_perm = x.view(B, S, D)[:, perm].reshape(B * S, D)
    p = router(x, _ctx()).probs_TE.view(B, S, E)
    p_perm = router(x_perm, _ctx()).probs_TE.view(B, S, E)
    torch.testing.assert_close(p_perm, p[:, perm])
    # ...and the mixing really couples tokens (else the check above would be trivial).
    assert (p - torch.softmax(x @ router.gate.weight.t(), -1).view(B, S, E)).abs().max() > 1e-3


def test_no_causal_leakage() -> None:
    router = _router(tau=2.0)
    x = torch.randn(B * S, D)
    j = 3
    x2 = x.clone()
    x2[j] += torch.randn(D)  # sequence 0, position 3
    p, p2 = router(x, _ctx()).probs_TE, router(x2, _ctx()).probs_TE
    assert torch.equal(p[:j], p2[:j])
    assert torch.equal(p[S:], p2[S:])  # the other sequence
    assert (p[j:S] - p2[j:S]).abs().amax(dim=-1).min() > 0  # every later token of sequence 0 sees it


def test_document_boundaries_are_masked() -> None:
    router = _router(causal=False, tau=2.0)
    doc = torch.tensor([0, 0, 0, 1, 1, 1] * B)
    x = torch.randn(B * S, D)
    G = router.similarity(x, _ctx(doc))
    assert (G[:, :3, 3:] == 0).all() and (G[:, 3:, :3] == 0).all()
    x2 = x.clone()
    x2[1] += torch.randn(D)  # document 0 of sequence 0
    p, p2 = router(x, _ctx(doc)).probs_TE, router(x2, _ctx(doc)).probs_TE
    assert torch.equal(p[3:], p2[3:])
    assert (p[:3] - p2[:3]).abs().amax(dim=-1).min() > 0


def test_layer_matches_naive_loop() -> None:
    check_layer_matches_naive(SimilarityConfig(k=2, d_sim=4), RouterContext(batch_size=2, seq_len=5), num_experts=4)


def test_needs_layout_and_config_errors() -> None:
    assert ROUTERS["similarity"] is SimilarityRouter
    with pytest.raises(ValueError, match="batch_size/seq_len"):
        _router()(torch.randn(4, D), RouterContext())
    with pytest.raises(ConfigError, match="router.mix"):
        SimilarityConfig(mix="weights")
    with pytest.raises(ConfigError, match="router.tau"):
        SimilarityConfig(tau=0.0)
    with pytest.raises(ConfigError, match="router.k"):
        SimilarityRouter(SimilarityConfig(k=9), d_model=D, num_experts=E)
