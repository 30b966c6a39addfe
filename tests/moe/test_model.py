"""The transformer: layer pattern, causality, initial loss scale, aux-loss plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import ConfigError
from moe.experts import ExpertsConfig
from moe.layer import MoELayer
from moe.model import Attention, DenseFFN, ModelConfig, MoETransformer, rope_tables
from moe.routers.topk import TopKConfig


def build(**kw: object) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"d_model": 32, "num_layers": 4, "num_heads": 4, "num_experts": 4, "d_ff": 32, "dense_d_ff": 64, **kw})
    return MoETransformer(cfg, TopKConfig(k=2), ExpertsConfig())


def test_moe_every_places_moe_layers() -> None:
    model = build(moe_every=2)
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [DenseFFN, MoELayer, DenseFFN, MoELayer]
    assert [i for i, _ in model.moe_layers()] == [1, 3]


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model = build(num_shared_experts=1).eval()
    x = torch.randint(0, 256, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("tied", [False, True])
def test_initial_loss_near_uniform(tied: bool) -> None:
    model = build(tie_embeddings=tied)
    x = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        logits, _ = model(x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).item()
    assert abs(ce - math.log(256)) < 1.5, ce


def test_aux_losses_summed_over_moe_layers() -> None:
    model = build(moe_every=2)
    x = torch.randint(0, 256, (2, 8))
    _, aux = model(x)
    per_layer = [layer.stats.summarize(*layer.stats.raw())["aux_loss"] for _, layer in model.moe_layers()]
    assert aux["aux_loss"].item() == pytest.approx(sum(per_layer), rel=1e-5)
    assert set(aux) == {"aux_loss", "z_loss"}


def test_bad_model_config_names_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.d_model \(30\) must be divisible by model\.num_heads \(4\)"):
        ModelConfig(d_model=30)
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        ModelConfig(num_layers=0)


def reference_attention(attn: Attention, x_BSD: torch.Tensor) -> torch.Tensor:
    """Head by head, in float64: query head h attends with K/V head h // (H / G), causally."""
    B, S, D = x_BSD.shape
    H, G, d = attn.num_heads, attn.num_kv_heads, D // attn.num_heads
    w = attn.qkv.weight.double()
    x = x_BSD.double()
    cos, sin = rope_tables(S, d, 10000.0, x.device)

    def rope(t: torch.Tensor) -> torch.Tensor:  # rotate (first half, second half) pairs by position
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    heads = []
    for h in range(H):
        g = h // (H // G)
        q = rope(x @ w[h * d : (h + 1) * d].T)
        k = rope(x @ w[(H + g) * d : (H + g + 1) * d].T)
        v = x @ w[(H + G + g) * d : (H + G + g + 1) * d].T
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.out.weight.double().T


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("want_probs", [False, True])
def test_grouped_query_attention_matches_per_head_reference(kv_heads: int, want_probs: bool) -> None:
    torch.manual_seed(kv_heads)
    attn = Attention(32, 4, kv_heads)
    assert attn.qkv.weight.shape == ((4 + 2 * kv_heads) * 8, 32)
    x = torch.randn(2, 7, 32)
    cos, sin = rope_tables(7, 8, 10000.0, x.device)
    y, probs = attn(x, cos, sin, want_probs)
    torch.testing.assert_close(y.double(), reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    assert (probs is not None) == want_probs


def test_num_kv_heads_shrinks_kv_projection_and_is_validated() -> None:
    full, grouped = build(), build(num_kv_heads=1)
    n_full = sum(p.numel() for p in full.parameters())
    n_grouped = sum(p.numel() for p in grouped.parameters())
    assert n_full - n_grouped == 4 * 2 * (4 - 1) * 8 * 32  # layers * (K and V) * dropped heads * head_dim * d_model
    with pytest.raises(ConfigError, match=r"model\.num_kv_heads \(3\) must divide model\.num_heads \(4\)"):
        ModelConfig(num_kv_heads=3)


@pytest.mark.parametrize(("device", "fp32_residual", "expected"), [
    ("meta", False, torch.bfloat16),  # meta stands for CUDA: autocast's dtype runs the residual stream
    ("meta", True, torch.float32),
    ("cpu", False, torch.float32),    # no CUDA autocast on a CPU: the stream stays fp32 even under CPU autocast
])
def test_residual_stream_dtype(device: str, fp32_residual: bool, expected: torch.dtype) -> None:
    from moe.autocast import meta_autocast

    with torch.device(device):
        model = MoETransformer(ModelConfig(num_layers=2), TopKConfig(k=2), ExpertsConfig(backend="grouped_mm" if device == "meta" else "auto"))
    model.prepare(torch.device(device))
    model.set_fp32_residual(fp32_residual)
    seen: list[torch.dtype] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    tokens = torch.zeros(2, 16, dtype=torch.long, device=device)
    with meta_autocast(lambda: torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens)
    assert seen == [expected] * 3  # into each block and into the final norm
