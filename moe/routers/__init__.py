"""Router registry: config name -> router class (each class carries its ``Config``, a ``RouterConfig``).

``router=<name>`` on the command line selects ``conf/router/<name>.yaml``, whose ``name`` field
picks the class here. Adding a router: one file in this folder (a ``Router`` subclass whose
``Config`` derives from ``RouterConfig``), one line in ``ROUTERS`` below, one YAML.
"""

from __future__ import annotations

from moe.errors import ConfigError
from moe.registry import load_classes
from moe.routers.interface import KRouterConfig, Router, RouterConfig, RouterContext, RoutingDecision


def load_routers(paths: dict[str, str]) -> dict[str, type[Router]]:
    """Import each ``module:Class`` and check that it is a ``Router`` whose ``Config`` is a ``RouterConfig``."""
    return load_classes(paths, Router, "router", lambda cls: issubclass(cls.Config, RouterConfig), " whose Config derives from RouterConfig")


ROUTERS: dict[str, type[Router]] = load_routers({
    "topk": "moe.routers.topk:TopKRouter",
    "dts": "moe.routers.dts:DTSRouter",
    "act_dts": "moe.routers.act_dts:ActivationDTSRouter",
    "sigmoid_bias": "moe.routers.sigmoid_bias:SigmoidBiasRouter",
    "expert_choice": "moe.routers.expert_choice:ExpertChoiceRouter",
    "hash": "moe.routers.hash:HashRouter",
    "comet": "moe.routers.comet:CometRouter",
    "dselect_k": "moe.routers.dselect_k:DSelectKRouter",
    "similarity": "moe.routers.similarity:SimilarityRouter",
    "attention_aware": "moe.routers.attention_aware:AttentionAwareRouter",
    "base": "moe.routers.base_layers:BaseLayersRouter",
})
"""Registry name -> router class, each given as ``"module:Class"`` (one line per router)."""


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``; a ConfigError naming router.name otherwise."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise ConfigError(f"router.name ({name!r}) is not a known router; choose one of {sorted(ROUTERS)}") from None


def build_router(cfg: RouterConfig, d_model: int, num_experts: int) -> Router:
    """Build the router named by ``cfg.name`` from its own config dataclass."""
    return router_class(cfg.name)(cfg, d_model, num_experts)


__all__ = ["KRouterConfig", "ROUTERS", "Router", "RouterConfig", "RouterContext", "RoutingDecision", "build_router", "load_routers", "router_class"]
