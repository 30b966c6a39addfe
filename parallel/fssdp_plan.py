"""FSSDP placement planning (Hecate, Qing et al. 2025, arXiv 2502.02581): pure, deterministic functions.

Shape legend: L MoE layers, E experts per layer, W ranks (devices).

Every rank calls these with the same all-reduced integer loads, so every rank computes the same
plan without exchanging it; ties are broken by (load, id) and all arithmetic on loads is integer.

- ``sparse_materialize`` — Algorithm 1 (§4.2): which ranks materialise which experts this step.
  With overlap degree t and memory cap m: if t <= m the t hottest experts go everywhere;
  otherwise the ``W*m`` extra slots are shared among the t hottest experts in proportion to their
  load (``assignSlotsByLoad``), replicas placed on nodes lacking the expert first, then on the
  ranks with the most free extra slots.
- ``heterogeneous_shard`` — Algorithm 2 (§4.3): who owns which expert, jointly over all layers.
  The ``L*E`` experts fill ``W`` equal slot budgets (memory balanced); the t hottest experts of a
  layer are placed last, anywhere (they get replicated by Algorithm 1 anyway); the cold ones, by
  decreasing load, go to the least-loaded node and then its least-loaded rank (ties: fewer free
  slots, then lower id, as in the paper's pseudocode), spreading load across nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def hottest(load_E: Sequence[int], k: int) -> list[int]:
    """The ``k`` experts with the largest load, hottest first, ties by lower id."""
    return sorted(range(len(load_E)), key=lambda e: (-load_E[e], e))[: max(k, 0)]


def initial_owners(num_experts: int, world: int) -> list[int]:
    """Homogeneous start (§4.3): contiguous, even blocks of experts per rank."""
    return [e * world // num_experts for e in range(num_experts)]


def sparse_materialize(owner_E: Sequence[int], load_E: Sequence[int], t: int, m: int, world: int, ranks_per_node: int) -> list[list[int]]:
    """Algorithm 1: the holders (ascending ranks, owner included) of each expert for one layer."""
    E = len(owner_E)
    holders = [{owner_E[e]} for e in range(E)]
    t = min(t, E)
    m = min(m, t)
    hot = hottest(load_E, t)
    if t <= m:
        for e in hot:
            holders[e] = set(range(world))
    else:
        total = world * m
        hot_load = sum(load_E[e] for e in hot)
        extra = [0] * world
        if hot_load > 0:
            for e in hot:  # hottest first
                want = (2 * total * load_E[e] + hot_load) // (2 * hot_load)  # round(total * F_e / sum F)
                for _ in range(want):
                    nodes_with = {d // ranks_per_node for d in holders[e]}
                    free = [d for d in range(world) if d not in holders[e] and extra[d] < m]
                    if not free:
                        break
                    d = min(free, key=lambda d: (d // ranks_per_node in nodes_with, -(m - extra[d]), d))
                    holders[e].add(d)
                    extra[d] += 1
    return [sorted(h) for h in holders]


def heterogeneous_shard(load_LE: Sequence[Sequence[int]], t: int, world: int, ranks_per_node: int) -> list[list[int]]:
    """Algorithm 2: owner rank of every (layer, expert), memory balanced, cold load spread across nodes."""
    L = len(load_LE)
    E = len(load_LE[0]) if L else 0
    base, rem = divmod(L * E, world)
    slots = [base + (1 if d < rem else 0) for d in range(world)]
    nodes = (world + ranks_per_node - 1) // ranks_per_node
    node_load = [0] * nodes
    dev_load = [0] * world
    owner = [[-1] * E for _ in range(L)]
    hot = [set(hottest(load_LE[l], min(t, E))) for l in range(L)]

    def node_free(n: int) -> int:
        return sum(slots[d] for d in range(n * ranks_per_node, min((n + 1) * ranks_per_node, world)))

    for l in sorted(range(L), key=lambda l: (-max(load_LE[l], default=0), l)):
        for e in sorted((e for e in range(E) if e not in hot[l]), key=lambda e: (-load_LE[l][e], e)):
            n = min((n for n in range(nodes) if node_free(n) > 0), key=lambda n: (node_load[n], node_free(n), n))
            devs = [d for d in range(n * ranks_per_node, min((n + 1) * ranks_per_node, world)) if slots[d] > 0]
            d = min(devs, key=lambda d: (dev_load[d], slots[d], d))
            owner[l][e] = d
            slots[d] -= 1
            node_load[n] += load_LE[l][e]
            dev_load[d] += load_LE[l][e]
    for l in range(L):
        for e in sorted(hot[l]):
            d = min((d for d in range(world) if slots[d] > 0), key=lambda d: (-slots[d], d))
            owner[l][e] = d
            slots[d] -= 1
    return owner


def plan_digest(owner_LE: Sequence[Sequence[int]], holders_LE: Sequence[Sequence[Sequence[int]]]) -> int:
    """A 63-bit hash of a whole plan, all-gathered in debug mode to prove every rank agrees."""
    text = repr(([list(o) for o in owner_LE], [[list(h) for h in hl] for hl in holders_LE]))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
