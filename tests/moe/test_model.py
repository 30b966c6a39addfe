"""The transformer: layer pattern, causality, initial loss scale, aux-loss plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from moe.errors import ConfigError
from moe.experts import ExpertsConfig
from moe.layer import MoELayer
from moe.model import DenseFFN, ModelConfig, MoETransformer
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
