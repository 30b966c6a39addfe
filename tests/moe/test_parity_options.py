"""Options added for parity with released MoE checkpoints, each against a float64 formula written here:
router.renormalize (Mixtral top-1, norm_topk_prob=False), model.qk_norm (OLMoE full, Qwen3 per head),
model.shared_expert_gate (Qwen2-MoE's sigmoid-gated shared expert)."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import ConfigError
from moe.layer import SharedExperts
from moe.model import Attention, ModelConfig, rope_tables
from moe.routers import RouterContext
from moe.routers.topk import TopKConfig, TopKRouter


def routed(renormalize: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_TK, expert_ids_TK, full softmax probs in float64) of a random top-k router."""
    torch.manual_seed(k)
    router = TopKRouter(TopKConfig(k=k, renormalize=renormalize, aux_loss_coef=0, z_loss_coef=0), d_model=16, num_experts=8)
    x = torch.randn(40, 16)
    d = router(x, RouterContext())
    probs = torch.softmax(x.double() @ router.gate.weight.double().t(), dim=-1)
    return d.weights_TK, d.expert_ids_TK, probs


def test_renormalize_always_gives_top1_weight_one() -> None:
    weights, ids, probs = routed("always", 1)
    assert torch.equal(weights, torch.ones_like(weights))
    assert torch.equal(ids[:, 0], probs.argmax(dim=-1))


@pytest.mark.parametrize("k", [2, 3])
def test_renormalize_always_equals_softmax_over_selected_logits(k: int) -> None:
    weights, ids, probs = routed("always", k)
    chosen = probs.gather(1, ids)
    torch.testing.assert_close(weights.double(), chosen / chosen.sum(dim=1, keepdim=True), rtol=1e-6, atol=1e-7)
    auto, auto_ids, _ = routed("auto", k)  # the GShard default for k >= 2 is the same rule
    assert torch.equal(weights, auto) and torch.equal(ids, auto_ids)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_renormalize_never_keeps_full_softmax_probabilities(k: int) -> None:
    weights, ids, probs = routed("never", k)
    torch.testing.assert_close(weights.double(), probs.gather(1, ids), rtol=1e-6, atol=1e-7)
    if k > 1:
        assert (weights.sum(dim=1) < 1 - 1e-3).all()  # 8 experts: the top k never hold all the mass


def test_renormalize_bad_value_names_key() -> None:
    with pytest.raises(ConfigError, match=r"router\.renormalize \('sometimes'\) must be one of \['auto', 'always', 'never'\]"):
        TopKConfig(renormalize="sometimes")


def reference_qk_norm_attention(attn: Attention, x_BSD: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """Float64, head by head; queries/keys RMS-normalised (times the norm weights) before RoPE."""
    B, S, D = x_BSD.shape
    H, G, d = attn.num_heads, attn.num_kv_heads, D // attn.num_heads
    x, w = x_BSD.double(), attn.qkv.weight.double()
    gq, gk = attn.q_norm.weight.double(), attn.k_norm.weight.double()

    def rms(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * g

    q_all, k_all = x @ w[: H * d].T, x @ w[H * d : (H + G) * d].T
    if mode == "full":
        q_all, k_all = rms(q_all, gq), rms(k_all, gk)
    cos, sin = rope_tables(S, d, 10000.0, x.device)
    heads = []
    for h in range(H):
        g = h // (H // G)
        q, k = q_all[..., h * d : (h + 1) * d], k_all[..., g * d : (g + 1) * d]
        if mode == "per_head":
            q, k = rms(q, gq), rms(k, gk)
        q = torch.cat([q[..., : d // 2] * cos - q[..., d // 2 :] * sin, q[..., : d // 2] * sin + q[..., d // 2 :] * cos], -1)
        k = torch.cat([k[..., : d // 2] * cos - k[..., d // 2 :] * sin, k[..., : d // 2] * sin + k[..., d // 2 :] * cos], -1)
        v = x @ w[(H + G + g) * d : (H + G + g + 1) * d].T
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.out.weight.double().T


@pytest.mark.parametrize("mode", ["full", "per_head"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("want_probs", [False, True])
def test_qk_norm_matches_reference(mode: str, kv_heads: int, want_probs: bool) -> None:
    torch.manual_seed(0)
    eps = 1e-6
    attn = Attention(32, 4, kv_heads, qk_norm=mode, norm_eps=eps)
    wide = mode == "full"
    assert attn.q_norm.weight.shape == ((32 if wide else 8),) and attn.k_norm.weight.shape == ((kv_heads * 8 if wide else 8),)
    with torch.no_grad():  # non-trivial gains, so a norm applied in the wrong place shows
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 32) * 3
    cos, sin = rope_tables(7, 8, 10000.0, x.device)
    y, _ = attn(x, cos, sin, want_probs)
    torch.testing.assert_close(y.double(), reference_qk_norm_attention(attn, x, mode, eps), rtol=1e-5, atol=1e-5)


def test_qk_norm_none_adds_no_parameters_and_bad_value_is_named() -> None:
    assert [n for n, _ in Attention(32, 4).named_parameters()] == ["qkv.weight", "out.weight"]
    with pytest.raises(ConfigError, match=r"model\.qk_norm \('rms'\) must be one of \['none', 'full', 'per_head'\]"):
        ModelConfig(qk_norm="rms")


def test_shared_expert_sigmoid_gate_matches_formula() -> None:
    torch.manual_seed(0)
    shared = SharedExperts(2, 16, 8, sigmoid_gate=True)
    x = torch.randn(30, 16)
    xd = x.double()
    h = torch.nn.functional.silu(xd @ shared.w_gate_DF.double()) * (xd @ shared.w_up_DF.double())
    gate = 1 / (1 + torch.exp(-(xd @ shared.w_sigmoid_D1.double())))
    torch.testing.assert_close(shared(x).double(), gate * (h @ shared.w_down_FD.double()), rtol=1e-5, atol=1e-6)
    assert shared.w_sigmoid_D1.shape == (16, 1)


def test_shared_expert_gate_off_by_default_and_needs_a_shared_expert() -> None:
    assert SharedExperts(1, 16, 8).w_sigmoid_D1 is None
    with pytest.raises(ConfigError, match=r"model\.shared_expert_gate \(True\) needs model\.num_shared_experts >= 1"):
        ModelConfig(shared_expert_gate=True)
