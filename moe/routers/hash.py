"""Hash routing (Roller et al., NeurIPS 2021): a fixed token-id -> expert table, no parameters.

Shape legend: T tokens, E experts, K slots (K = 1).

*Hash Layers For Large Sparse Models* (arXiv 2106.04426) §3: ``e_t = hash(token_id_t)`` with a
fixed random hash; the expert output is used with weight 1 and nothing is learned by the router
(``Hsword/Hetu: python/hetu/layers/HashGate.py``). The table here is a balanced random hash:
a seeded random permutation of ``range(table_size)`` taken modulo E, so each expert owns
``table_size / E`` entries (±1) at random positions, and token ``i`` uses entry
``i % table_size``. The table is a persistent buffer, so a checkpoint carries its own mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.routers.base import Router, RouterContext, RoutingDecision


@dataclass(kw_only=True)
class HashConfig:
    name: str = "hash"
    table_size: int = 65536
    """Entries of the hash table; token id i uses entry i % table_size (>= the vocabulary avoids sharing)."""
    seed: int = 0
    """Seed of the random table (the same on every rank)."""

    def __post_init__(self) -> None:
        check(self.table_size >= 1, "router.table_size", self.table_size, "must be >= 1")
        check(self.seed >= 0, "router.seed", self.seed, "must be >= 0")


def hash_table(table_size: int, num_experts: int, seed: int) -> Tensor:
    """Balanced random table: ``randperm(table_size) % E`` from a CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(table_size, generator=gen) % num_experts


class HashRouter(Router):
    """``e_t = table[token_id_t % table_size]``, weight 1, k = 1 (Roller et al. 2021)."""

    Config = HashConfig

    def __init__(self, cfg: HashConfig, d_model: int, num_experts: int) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg
        self.register_buffer("table", hash_table(cfg.table_size, num_experts, cfg.seed))

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        ids_T = context.token_ids_T
        if ids_T is None:
            raise ValueError("router hash needs the input token ids: RouterContext.token_ids_T is None")
        if ids_T.shape != (x_TD.shape[0],):
            raise ValueError(f"router hash: token_ids_T has shape {tuple(ids_T.shape)}, expected ({x_TD.shape[0]},)")
        ids_TK = self.table[ids_T.to(self.table.device).long() % self.cfg.table_size].unsqueeze(1)
        return RoutingDecision(
            expert_ids_TK=ids_TK,
            weights_TK=torch.ones(ids_TK.shape, device=x_TD.device),
            probs_TE=nn.functional.one_hot(ids_TK[:, 0], self.num_experts).float(),
        )
