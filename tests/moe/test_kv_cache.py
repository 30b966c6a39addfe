"""KV-cached decoding (moe/model.py KVCache) reproduces the full forward's logits, for every per-token router."""

from __future__ import annotations

import pytest
import torch

from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import ROUTERS

PER_TOKEN = [name for name, cls in ROUTERS.items() if cls.per_token]


def build(router: str, experts: ExpertsConfig | None = None, **kw: object) -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"d_model": 32, "num_layers": 3, "num_heads": 4, "num_experts": 4, "d_ff": 32, "dense_d_ff": 64,
                         "moe_every": 1, **kw})
    router_cfg = ROUTERS[router].Config(**({"k": 2} if "k" in ROUTERS[router].Config.__dataclass_fields__ else {}))
    return MoETransformer(cfg, router_cfg, experts or ExpertsConfig()).eval()


def cached_logits(model: MoETransformer, x_BS: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits of ``x_BS`` fed through one cache in consecutive pieces of these lengths."""
    cache = model.new_kv_cache()
    out, start = [], 0
    for n in pieces:
        out.append(model(x_BS[:, start:start + n], cache=cache)[0])
        start += n
    assert start == x_BS.shape[1] and cache.length == start
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("router", PER_TOKEN)
def test_cached_equals_uncached_for_every_per_token_router(router: str) -> None:
    model = build(router)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)[0]
        cached = cached_logits(model, x, [7, 1, 1, 4, 1, 2])  # prefill, single steps, and chunks after a prefix
    assert float((full - cached).abs().max()) < 1e-5, router
    with torch.no_grad():
        assert torch.equal(full, cached_logits(model, x, [16]))  # a prefill is the uncached forward itself


@pytest.mark.parametrize("kw", [dict(num_kv_heads=2), dict(qk_norm="full"), dict(qk_norm="per_head", moe_every=2, num_shared_experts=1,
                                                                                      shared_expert_gate=True), dict(tie_embeddings=True)])
def test_cached_equals_uncached_across_attention_variants(kw: dict) -> None:
    model = build("topk", **kw)
    x = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(x)[0] - cached_logits(model, x, [1] * 12)).abs().max()
    assert float(diff) < 1e-5, kw


def test_models_a_cache_cannot_reproduce_are_refused() -> None:
    for router in [name for name, cls in ROUTERS.items() if not cls.per_token]:
        with pytest.raises(ValueError, match="mixes information across tokens"):
            build(router).new_kv_cache()
    with pytest.raises(ValueError, match=r"experts\.capacity_factor=1\.25"):
        build("topk", ExpertsConfig(capacity_factor=1.25)).new_kv_cache()
    model = build("topk", max_seq_len=8)
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence length 9 exceeds model.max_seq_len"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
