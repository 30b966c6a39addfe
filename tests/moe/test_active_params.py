"""The model reports its experts per token and active parameters (MoETransformer.active_params),
whatever the router: hand counts for a router with k and for routers without one."""

from __future__ import annotations

import pytest

from moe.experts import ExpertsConfig
from moe.model import ModelConfig, MoETransformer
from moe.routers.expert_choice import ExpertChoiceConfig
from moe.routers.hash import HashConfig
from moe.routers.topk import TopKConfig

# V 32, D 16, 2 layers of 2 heads of 8 (MoE every layer), E 4 experts of F 8, untied head.
CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_experts=4, d_ff=8)
ATTENTION = 16 * 48 + 16 * 16  # qkv (2 query + 2 x 2 kv heads of 8) and the output projection
EXPERT = 3 * 16 * 8  # gate, up (D x F) and down (F x D)
HEAD = 32 * 16


def test_topk_counts_k_experts_and_the_gate() -> None:
    model = MoETransformer(CFG, TopKConfig(k=3), ExpertsConfig())
    assert model.experts_per_token() == {0: 3, 1: 3}
    assert model.active_params() == 2 * (ATTENTION + 16 * 4 + 3 * EXPERT) + HEAD == 4992


@pytest.mark.parametrize("router_cfg", [HashConfig(), ExpertChoiceConfig()], ids=["hash", "expert_choice"])
def test_routers_without_k_count_one_expert(router_cfg) -> None:
    model = MoETransformer(CFG, router_cfg, ExpertsConfig())
    gate = 0 if isinstance(router_cfg, HashConfig) else 16 * 4  # hash routing has no parameters
    assert model.experts_per_token() == {0: 1, 1: 1}
    assert model.active_params() == 2 * (ATTENTION + gate + EXPERT) + HEAD
