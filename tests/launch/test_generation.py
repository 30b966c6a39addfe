"""launch/generation.py: nucleus filter against its definition; KV-cached sampling equals recomputing."""

from __future__ import annotations

import pytest
import torch

from launch.generation import generate, nucleus_filter, nucleus_reference
from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers import ROUTERS


def model(router: str = "topk") -> MoETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_experts=4, d_ff=32, dense_d_ff=64, max_seq_len=64)
    kw = {"k": 2} if "k" in ROUTERS[router].Config.__dataclass_fields__ else {}
    return MoETransformer(cfg, ROUTERS[router].Config(**kw), ExpertsConfig()).eval()


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_nucleus_filter_matches_the_definition(top_p: float) -> None:
    g = torch.Generator().manual_seed(int(top_p * 1000))
    probs = torch.softmax(torch.randn(6, 50, generator=g, dtype=torch.float64) * 3, dim=-1)
    got = nucleus_filter(probs, top_p)
    want = torch.tensor([nucleus_reference(row, top_p) for row in probs.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert bool(((got > 0).sum(dim=-1) >= 1).all())


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_cached_sampling_equals_recomputing(temperature: float, top_p: float) -> None:
    net = model()
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(3))
    runs = [generate(net, prompt, 20, temperature, top_p, torch.Generator().manual_seed(7), use_cache=c) for c in (True, False)]
    assert runs[0].shape == (3, 25) and torch.equal(runs[0][:, :5], prompt)
    assert torch.equal(runs[0], runs[1])


def test_models_without_a_cache_still_generate_and_eos_stops() -> None:
    net = model("similarity")
    assert net.kv_cache_refusal() is not None
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))
    out = generate(net, prompt, 6)
    assert torch.equal(out, generate(net, prompt, 6, use_cache=False))
    greedy = generate(model(), prompt, 10)
    eos = int(greedy[0, 6])  # the third token row 0 produces
    stopped = generate(model(), prompt[:1], 10, eos_id=eos)
    first = int((greedy[0, 4:] == eos).nonzero()[0]) + 4  # where greedy decoding first produces it
    assert torch.equal(stopped, greedy[:1, :first + 1])
    with pytest.raises(ValueError, match=r"exceeds model.max_seq_len \(64\)"):
        generate(net, prompt, 61)
    with pytest.raises(ValueError, match="top_p"):
        generate(net, prompt, 1, temperature=1.0, top_p=0.0)


def test_vocab_limit_keeps_samples_inside_the_tokenizer() -> None:
    net = model()
    prompt = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(5))
    for temperature in (0.0, 2.0):
        out = generate(net, prompt, 30, temperature, 1.0, torch.Generator().manual_seed(0), vocab_limit=10)
        assert int(out[:, 3:].max()) < 10
