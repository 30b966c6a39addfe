"""The router seam: every config derives from RouterConfig, k is checked in one place with one
message, the registry refuses what is not a router, the shared gate init draws what each router
drew inline, and every shape suffix in moe/routers uses a letter of its one legend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from moe.errors import ConfigError
from moe.routers import ROUTERS, KRouterConfig, RouterConfig, interface, load_routers
from moe.routers.gate import normal_gate

K_ROUTERS = sorted(name for name, cls in ROUTERS.items() if issubclass(cls.Config, KRouterConfig))
OTHER_ROUTERS = sorted(set(ROUTERS) - set(K_ROUTERS))
SUFFIX = re.compile(r"\b[a-z][a-z0-9_]*_([A-Z][A-Za-z0-9]*)\b")  # as tests/moe/test_shape_legend.py reads moe's


def test_every_config_derives_from_router_config() -> None:
    assert all(issubclass(cls.Config, RouterConfig) for cls in ROUTERS.values())
    # Subsets, not the whole registry: adding a router must not need an edit here.
    assert {"act_dts", "attention_aware", "comet", "dselect_k", "dts", "sigmoid_bias", "similarity", "topk"} <= set(K_ROUTERS)
    assert {"base", "expert_choice", "hash"} <= set(OTHER_ROUTERS)
    assert all(ROUTERS[name].Config().name == name for name in ROUTERS)


@pytest.mark.parametrize("name", K_ROUTERS)
def test_k_is_checked_once_with_one_message(name: str) -> None:
    config = ROUTERS[name].Config
    with pytest.raises(ConfigError) as err:
        config(k=0)
    assert str(err.value) == "router.k (0) must be >= 1"
    cfg = config(k=5)
    assert cfg.experts_per_token == 5
    cfg.check_num_experts(8)
    with pytest.raises(ConfigError) as err:
        cfg.check_num_experts(4)
    assert str(err.value) == "router.k (5) must be <= model.num_experts (4)"
    with pytest.raises(ConfigError) as err:  # the router runs the same check when it is built
        ROUTERS[name](cfg, 8, 4)
    assert str(err.value) == "router.k (5) must be <= model.num_experts (4)"


@pytest.mark.parametrize("name", OTHER_ROUTERS)
def test_routers_without_k_count_one_expert_per_token(name: str) -> None:
    cfg = ROUTERS[name].Config()
    assert "k" not in cfg.__dataclass_fields__
    assert cfg.experts_per_token == 1
    cfg.check_num_experts(1)


def test_rules_against_num_experts_live_in_the_config() -> None:
    # What the routers checked only when built, the job now checks before building anything.
    with pytest.raises(ConfigError, match=r"^router\.threshold \(0\.3\) must be < 1/model\.num_experts"):
        ROUTERS["dts"].Config(threshold=0.3).check_num_experts(4)
    with pytest.raises(ConfigError, match=r"^model\.num_experts \(1\) must be >= 2 for the comet router$"):
        ROUTERS["comet"].Config(k=1).check_num_experts(1)
    with pytest.raises(ConfigError, match=r"^router\.n_groups \(3\) must divide model\.num_experts \(8\)$"):
        ROUTERS["sigmoid_bias"].Config(n_groups=3, topk_groups=1).check_num_experts(8)


def test_registry_refuses_what_is_not_a_router() -> None:
    assert load_routers({"topk": "moe.routers.topk:TopKRouter"}) == {"topk": ROUTERS["topk"]}
    with pytest.raises(TypeError, match="router 'gate'"):
        load_routers({"gate": "moe.routers.gate:normal_gate"})


def test_normal_gate_draws_what_the_routers_drew_inline() -> None:
    torch.manual_seed(3)
    gate = normal_gate(64, 16)
    after = torch.rand(3)
    torch.manual_seed(3)
    inline = nn.Linear(64, 16, bias=False)
    nn.init.normal_(inline.weight, std=64**-0.5)
    assert gate.bias is None and gate.weight.shape == (16, 64)
    assert torch.equal(gate.weight, inline.weight)
    assert torch.equal(after, torch.rand(3))  # the same draws consumed: later draws unchanged
    wide = normal_gate(1024, 512).weight
    assert abs(float(wide.detach().std()) - 1024**-0.5) < 0.02 * 1024**-0.5


def legend() -> list[str]:
    """The letters ``moe/routers``'s legend defines (``- ``X`` meaning`` lines of the interface docstring)."""
    return [m.group(1) for line in (interface.__doc__ or "").splitlines() if (m := re.match(r"- ``([A-Za-z])``", line))]


def test_the_routers_legend_defines_each_letter_once() -> None:
    letters = legend()
    assert len(letters) == len(set(letters)) and {"B", "S", "T", "E", "K", "Z"} <= set(letters)


def test_every_suffix_letter_in_moe_routers_is_in_its_legend() -> None:
    allowed = set(legend()) | set("0123456789")
    files = sorted(Path(interface.__file__).parent.glob("*.py"))
    assert len(files) > 10
    stray = sorted({f"{p.name}: {m.group(0)}" for p in files for m in SUFFIX.finditer(p.read_text())
                    if not set(m.group(1)) <= allowed})
    assert not stray, stray
