"""Router registry: config name -> router class (each class carries its ``Config`` dataclass).

``router=<name>`` on the command line selects ``conf/router/<name>.yaml``, whose ``name`` field
picks the class here. Adding a router: one file in this folder, one line below, one YAML.
"""

from __future__ import annotations

from typing import Any

from moe.errors import ConfigError
from moe.routers.act_dts import ActivationDTSRouter
from moe.routers.attention_aware import AttentionAwareRouter
from moe.routers.base import Router, RouterContext, RoutingDecision
from moe.routers.base_layers import BaseLayersRouter
from moe.routers.comet import CometRouter
from moe.routers.dselect_k import DSelectKRouter
from moe.routers.dts import DTSRouter
from moe.routers.expert_choice import ExpertChoiceRouter
from moe.routers.hash import HashRouter
from moe.routers.sigmoid_bias import SigmoidBiasRouter
from moe.routers.similarity import SimilarityRouter
from moe.routers.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "dts": DTSRouter,
    "act_dts": ActivationDTSRouter,
    "sigmoid_bias": SigmoidBiasRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
    "comet": CometRouter,
    "dselect_k": DSelectKRouter,
    "similarity": SimilarityRouter,
    "attention_aware": AttentionAwareRouter,
    "base": BaseLayersRouter,
}


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; a ConfigError naming router.name otherwise."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise ConfigError(f"router.name ({name!r}) is not a known router; choose one of {sorted(ROUTERS)}") from None


def build_router(cfg: Any, d_model: int, num_experts: int) -> Router:
    """Build the router named by ``cfg.name`` from its own config dataclass."""
    return router_class(cfg.name)(cfg, d_model, num_experts)


__all__ = ["ROUTERS", "Router", "RouterContext", "RoutingDecision", "build_router", "router_class"]
