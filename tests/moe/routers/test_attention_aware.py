"""Attention-aware routing: mixing by the preceding attention's probabilities (routers.md §6)."""

from __future__ import annotations

import pytest
import torch

from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import ROUTERS, RouterContext, RoutingDecision
from moe.routers.attention_aware import AttentionAwareConfig, AttentionAwareRouter
from moe.routers.topk import TopKConfig, TopKRouter
from tests.moe.routers.naive_layer import check_layer_matches_naive

B, S, D, E = 2, 6, 16, 8


def _router(**kw: object) -> AttentionAwareRouter:
    torch.manual_seed(0)
    return AttentionAwareRouter(AttentionAwareConfig(**kw), d_model=D, num_experts=E)  # type: ignore[arg-type]


def _causal_attention(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, S, S, generator=g)
    return torch.softmax(scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf")), dim=-1)


def _ctx(attn: torch.Tensor, doc_ids: torch.Tensor | None = None) -> RouterContext:
    return RouterContext(batch_size=B, seq_len=S, attn_probs_BSS=attn, doc_ids_T=doc_ids)


def test_identity_attention_reproduces_topk_exactly() -> None:
    router = _router(k=2)
    topk = TopKRouter(TopKConfig(k=2), d_model=D, num_experts=E)
    topk.gate.weight.data.copy_(router.gate.weight.data)
    x = torch.randn(B * S, D)
    d, ref = router(x, _ctx(torch.eye(S).expand(B, S, S))), topk(x, RouterContext())
    assert torch.equal(d.expert_ids_TK, ref.expert_ids_TK) and torch.equal(d.weights_TK, ref.weights_TK)
    assert torch.equal(d.probs_TE, ref.probs_TE)


def test_mixed_distribution_is_attention_times_pi_per_token() -> None:
    router = _router()
    A = _causal_attention()
    x = torch.randn(B * S, D)
    d = router(x, _ctx(A))
    pi = torch.softmax(x @ router.gate.weight.t(), dim=-1).detach()
    for n in range(B):
        for i in range(S):
            expected = sum(A[n, i, j] * pi[n * S + j] for j in range(S))
            torch.testing.assert_close(d.probs_TE[n * S + i], expected)
    torch.testing.assert_close(d.probs_TE.sum(dim=-1), torch.ones(B * S))


def test_future_attention_entries_are_ignored() -> None:
    router = _router()
    A = _causal_attention()
    leaky = A + torch.rand(B, S, S).triu(1)  # mass on later tokens: must be masked away
    x = torch.randn(B * S, D)
    torch.testing.assert_close(router(x, _ctx(leaky)).probs_TE, router(x, _ctx(A)).probs_TE)


def test_document_boundaries_are_masked_and_rows_renormalised() -> None:
    router = _router()
    A = _causal_attention()
    doc = torch.tensor([0, 0, 1, 1, 1, 1] * B)
    x = torch.randn(B * S, D)
    d = router(x, _ctx(A, doc))
    same = (doc.view(B, S).unsqueeze(2) == doc.view(B, S).unsqueeze(1)).float()
    A_doc = A * same
    A_doc = A_doc / A_doc.sum(dim=-1, keepdim=True)
    pi = torch.softmax(x @ router.gate.weight.t(), dim=-1).detach().view(B, S, E)
    torch.testing.assert_close(d.probs_TE, (A_doc @ pi).reshape(B * S, E))
    assert (d.probs_TE.view(B, S, E)[:, 2] - pi[:, 2]).abs().max() < 1e-6  # first token of doc 1 sees only itself


def _tiny_model() -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_experts=4, d_ff=16, dense_d_ff=32, max_seq_len=16)
    return MoETransformer(cfg, AttentionAwareConfig(k=2), ExpertsConfig(backend="torch"))


def _capture(model: MoETransformer) -> list[tuple[RouterContext, RoutingDecision]]:
    seen: list[tuple[RouterContext, RoutingDecision]] = []
    for _, layer in model.moe_layers():
        router = layer.router
        original = router.forward

        def forward(x_TD: torch.Tensor, context: RouterContext, original=original) -> RoutingDecision:
            decision = original(x_TD, context)
            seen.append((context, decision))
            return decision

        router.forward = forward  # type: ignore[method-assign]
    return seen


def test_inside_the_model_receives_causal_row_stochastic_attention() -> None:
    model = _tiny_model()
    assert all(layer.router.needs_attention for _, layer in model.moe_layers())
    seen = _capture(model)
    tokens = torch.randint(0, 64, (B, S))
    logits, aux = model(tokens)
    assert len(seen) == 2 and torch.isfinite(logits).all() and "aux_loss" in aux
    for context, _ in seen:
        A = context.attn_probs_BSS
        assert A is not None and A.shape == (B, S, S)
        assert (A.triu(1) == 0).all()
        torch.testing.assert_close(A.sum(dim=-1), torch.ones(B, S))
        assert (A[:, torch.ones(S, S, dtype=torch.bool).tril()] > 0).all()


def test_no_causal_leakage_through_the_model() -> None:
    model = _tiny_model()
    seen = _capture(model)
    tokens = torch.randint(0, 64, (B, S))
    tokens2 = tokens.clone()
    j = 3
    tokens2[:, j] = (tokens[:, j] + 1) % 64
    model(tokens)
    model(tokens2)
    for layer in range(2):
        p = seen[layer][1].probs_TE.view(B, S, E // 2)
        p2 = seen[2 + layer][1].probs_TE.view(B, S, E // 2)
        torch.testing.assert_close(p[:, :j], p2[:, :j], rtol=0, atol=1e-6)
        assert (p[:, j:] - p2[:, j:]).abs().max() > 1e-4


def test_layer_matches_naive_loop() -> None:
    ctx = RouterContext(batch_size=B, seq_len=S, attn_probs_BSS=_causal_attention(2))
    check_layer_matches_naive(AttentionAwareConfig(k=2), ctx, num_experts=4)


def test_missing_attention_is_an_error() -> None:
    assert ROUTERS["attention_aware"] is AttentionAwareRouter
    with pytest.raises(ValueError, match="attn_probs_BSS"):
        _router()(torch.randn(B * S, D), RouterContext(batch_size=B, seq_len=S))
