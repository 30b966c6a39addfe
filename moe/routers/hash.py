"""Hash routing (Roller et al., NeurIPS 2021): a fixed token-id -> expert table, no parameters.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, E experts, K slots (K = 1),
V vocabulary, H hash-table entries (``router.table_size``).

*Hash Layers For Large Sparse Models* (arXiv 2106.04426) §3: ``e_t = hash(token_id_t)`` with a
fixed random hash; the expert output is used with weight 1 and nothing is learned by the router
(``Hsword/Hetu: python/hetu/layers/HashGate.py``). Two tables (``router.balance``):

- ``random`` (default): a seeded random permutation of ``range(table_size)`` taken modulo E, so
  each expert owns ``table_size / E`` entries (±1) at random positions. Balanced in token *ids*,
  not in tokens: on skewed text (bytes, Zipfian vocabularies) the experts holding the frequent
  ids get most of the load.
- ``frequency``: the paper's balanced assignment, built from token frequencies of the training
  data before training (``fit_token_counts``): ids in decreasing frequency, each to the expert with
  the least frequency mass so far (greedy longest-processing-time), ties to the expert with fewer
  ids, then the lower index; ids never seen in the counted sample then go, one at a time, to the
  expert holding the fewest ids. An id heavier than 1/E of all tokens still fills an expert alone.

Token ``i`` uses entry ``i % table_size``. The table is a persistent buffer, so a checkpoint
carries its own mapping.

Checked against the authors' release, ``facebookresearch/ParlAI:
projects/params_vs_compute/hash_ladder/hash_ladder.py`` (``HashLayerFFN``), and
``Hsword/Hetu: python/hetu/layers/HashGate.py``:

- the expert is a function of the *current input token id* only, weight 1, one expert per token,
  no router parameters and no auxiliary loss: the same;
- the release's random hash draws each id's bin i.i.d. (``random.randrange(hash_size)``, seed 42),
  so experts hold a multinomial number of ids; our ``random`` table is a seeded permutation modulo
  E, which holds the same number of ids per expert (±1). Kept on purpose: it is a random fixed
  assignment as the paper's "Random Hash", minus the avoidable id imbalance (with 256 byte ids
  over 8 experts the i.i.d. draw leaves some experts ~25% more ids than others);
- ``balance = frequency`` is the paper's "Balanced assignment" (§3: ids sorted by frequency,
  each to the least-loaded expert); the release leaves it to the user ("insert your choice of
  hash function"), so it is from the paper's text;
- the release puts one hash layer in the network (``--hash-layer``, default layer 7, 32 bins);
  here every MoE layer of the model routes by hash (``model.moe_every`` controls which layers
  are MoE); each hash layer uses the same table (the id decides, not the layer).
- Defaults: ``table_size = 65536`` (>= any vocabulary here, so no two ids share an entry),
  ``seed = 0``, ``balance = random`` (the release's default kind of hash).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.routers.interface import Router, RouterConfig, RouterContext, RoutingDecision


@dataclass(kw_only=True)
class HashConfig(RouterConfig):
    name: str = "hash"
    table_size: int = 65536
    """Entries of the hash table; token id i uses entry i % table_size (>= the vocabulary avoids sharing)."""
    seed: int = 0
    """Seed of the random table (the same on every rank)."""
    balance: str = "random"
    """random: ids spread evenly; frequency: token mass spread evenly, from training-data counts."""
    count_tokens: int = 10_000_000
    """balance=frequency: how many training tokens (evenly spaced windows over the split) are counted."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.table_size >= 1, "router.table_size", self.table_size, "must be >= 1")
        check(self.seed >= 0, "router.seed", self.seed, "must be >= 0")
        check(self.balance in ("random", "frequency"), "router.balance", self.balance, "must be random or frequency")
        check(self.count_tokens >= 1, "router.count_tokens", self.count_tokens, "must be >= 1")


def hash_table(table_size: int, num_experts: int, seed: int) -> Tensor:
    """Balanced random table: ``randperm(table_size) % E`` from a CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(table_size, generator=gen) % num_experts


def frequency_table(counts_V: Tensor, table_size: int, num_experts: int) -> Tensor:
    """Greedy balanced table: each id, most frequent first, to the expert with the least mass.

    ``counts_V`` counts token id v of the training data; id v lands in entry ``v % table_size``
    (entries sharing ids pool their counts). Ties go to the expert holding fewer entries, then to
    the lower expert index; entries with no count go to the expert holding the fewest entries.
    Deterministic, so every rank builds the same table.
    """
    mass_H = torch.zeros(table_size, dtype=torch.float64)
    ids = torch.arange(counts_V.shape[0])
    mass_H.index_add_(0, ids % table_size, counts_V.double())
    masses = mass_H.tolist()
    order = sorted(range(table_size), key=lambda n: (-masses[n], n))
    seen = [n for n in order if masses[n] > 0]
    load = [(0.0, 0, e) for e in range(num_experts)]  # (mass, entries, expert): a min-heap
    heapq.heapify(load)
    table = torch.empty(table_size, dtype=torch.int64)
    for n in seen:
        mass, entries, e = heapq.heappop(load)
        table[n] = e
        heapq.heappush(load, (mass + masses[n], entries + 1, e))
    entries_E = [0] * num_experts
    for _, entries, e in load:
        entries_E[e] = entries
    fill = [(entries_E[e], e) for e in range(num_experts)]  # never counted: spread by entries
    heapq.heapify(fill)
    for n in order[len(seen):]:
        entries, e = heapq.heappop(fill)
        table[n] = e
        heapq.heappush(fill, (entries + 1, e))
    return table


class HashRouter(Router):
    """``e_t = table[token_id_t % table_size]``, weight 1, k = 1 (Roller et al. 2021)."""

    Config = HashConfig
    cfg: HashConfig

    def __init__(self, cfg: HashConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        self.register_buffer("table", hash_table(cfg.table_size, num_experts, cfg.seed))

    @property
    def wants_token_counts(self) -> int:
        return self.cfg.count_tokens if self.cfg.balance == "frequency" else 0

    @torch.no_grad()
    def fit_token_counts(self, counts_V: Tensor) -> None:
        """``balance=frequency``: rebuild the table from training-data token counts (no-op for random)."""
        if self.cfg.balance == "frequency":
            self.table.copy_(frequency_table(counts_V.cpu(), self.cfg.table_size, self.num_experts))

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
