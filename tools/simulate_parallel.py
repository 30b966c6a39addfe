"""Estimate per-step communication and straggler time of expert parallelism vs FSSDP at scale.

Shape legend: L MoE layers, E experts per layer, G GPUs, D model dim, F expert ffn dim.

Usage (markdown table on stdout)::

    python -m tools.simulate_parallel --zipf 1.2 --gpus 8 64 512 --fssdp-shard 8
    python -m tools.simulate_parallel --metrics outputs/run/metrics.jsonl --gpus 8 64 --d-model 4096 --d-ff 14336

Routing loads come from a real run (the ``routing/layer{i}/tokens_per_expert`` lists in a
``metrics.jsonl``, summed over the logged steps) or from a Zipf law ``p_e ~ 1/(rank_e)^s``.
Only the *distribution* over experts is used; every GPU holds ``tokens_per_gpu`` tokens routed
to ``k`` experts drawn from it (sources are assumed statistically identical).

Model, per MoE layer per training step (forward + backward):

- EP (ep = min(G, E), experts in contiguous blocks; replicas G/ep all-reduce expert grads):
  four token all-to-alls (dispatch, combine, and both again in backward). GPU g sends its slots
  for experts owned elsewhere and receives every slot of its own experts from the other
  ep - 1 GPUs of its group: ``recv_g = (ep - 1) * T * k * P_g`` rows, P_g the load share of g's
  experts. A transfer takes ``max(intra_bytes / intra_bw, inter_bytes / inter_bw)``; peers are
  spread uniformly, so a fraction ``(gpn - 1) / (ep - 1)`` of them share the node.
- FSSDP (``parallel.fssdp``: homogeneous owners, Algorithm 1 with t, m from
  ``parallel.fssdp_plan``): slots for an expert held locally stay; others go to the holders on
  the node, else to all holders, split evenly (as ``FSSDPRunner`` does). Weight traffic per
  layer: spAG = spRS = sum_e |W_e| (holders_e - 1) (spAG twice with re-materialisation).
- Hybrid FSSDP (``--fssdp-shard S``, ``parallel.fssdp.shard_size``): FSSDP inside each group of S
  GPUs (the same plan in every group), then each owner all-reduces its experts' gradients with
  its G/S - 1 replicas (ring: 2 (R-1)/R of its owned bytes).
- Expert state: the busiest GPU's owned experts at ``bytes_per_elem`` plus two fp32 Adam moments,
  plus its gathered (non-owned) copies at ``bytes_per_elem``.
- Compute: ``6 * 3 * D * F`` FLOPs per routed slot (3 GEMMs, forward + 2x backward) at
  ``tflops``; straggler time = slowest GPU minus the mean GPU.

All numbers are per GPU per step: "max" is the busiest GPU (the one every other GPU waits for).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from parallel.fssdp_plan import initial_owners, sparse_materialize


@dataclass(kw_only=True)
class SimConfig:
    gpus: int
    gpus_per_node: int = 8
    num_experts: int = 64
    num_layers: int = 1
    k: int = 2
    d_model: int = 4096
    d_ff: int = 14336
    tokens_per_gpu: int = 8192
    bytes_per_elem: int = 2
    intra_gbps: float = 300.0
    """Per-GPU intra-node bandwidth, GB/s (NVLink)."""
    inter_gbps: float = 50.0
    """Per-GPU inter-node bandwidth, GB/s (400 Gb/s NIC)."""
    tflops: float = 400.0
    t: int = 4
    m: int = 4
    remat: bool = False
    fssdp_shard: int = 0
    """``parallel.fssdp.shard_size``: FSSDP inside groups of this many GPUs, groups replicated (0 = all GPUs)."""


@dataclass
class Estimate:
    token_bytes_max: float  # token all-to-all bytes sent or received by the busiest GPU
    weight_bytes_max: float  # expert weight/grad bytes (spAG + spRS, or EDP all-reduce)
    comm_s: float  # time of the busiest GPU's transfers
    compute_max_s: float
    straggler_s: float  # slowest GPU compute minus mean GPU compute
    expert_mem_max: float = 0.0  # busiest GPU: owned experts' params + 2 fp32 Adam moments, plus gathered copies


def link_time(bytes_: float, intra_frac: float, cfg: SimConfig) -> float:
    """Seconds to move ``bytes_`` when ``intra_frac`` of them stay inside a node and the rest cross
    nodes, both at once: the slower of the two links bounds it."""
    return max(bytes_ * intra_frac / (cfg.intra_gbps * 1e9), bytes_ * (1 - intra_frac) / (cfg.inter_gbps * 1e9))


def normalise(load_E: list[float]) -> list[float]:
    total = float(sum(load_E))
    return [x / total for x in load_E] if total > 0 else [1.0 / len(load_E)] * len(load_E)


def zipf_loads(num_experts: int, s: float, num_layers: int = 1) -> list[list[float]]:
    """``p_e ~ 1 / e^s`` (expert 0 hottest), the same for every layer."""
    return [normalise([1.0 / (e + 1) ** s for e in range(num_experts)]) for _ in range(num_layers)]


def loads_from_metrics(path: str | Path) -> list[list[float]]:
    """Per-layer expert load shares from a run's metrics.jsonl (summed over every logged step)."""
    sums: dict[int, list[float]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith("routing/layer") and key.endswith("/tokens_per_expert"):
                layer = int(key.split("/")[1].removeprefix("layer"))
                acc = sums.setdefault(layer, [0.0] * len(value))
                for e, c in enumerate(value):
                    acc[e] += c
    if not sums:
        raise ValueError(f"{path} has no routing/layer*/tokens_per_expert metrics")
    return [normalise(sums[layer]) for layer in sorted(sums)]


def _compute(slots_G: list[float], cfg: SimConfig) -> tuple[float, float]:
    flops = 18.0 * cfg.d_model * cfg.d_ff
    times = [s * flops / (cfg.tflops * 1e12) for s in slots_G]
    return max(times), max(times) - sum(times) / len(times)


def ep_token_bytes(p_E: list[float], cfg: SimConfig) -> list[tuple[float, float]]:
    """(bytes sent, bytes received) of each GPU of an EP group in one layer's four token
    all-to-alls of a step (the counters ``comm/ep_a2a_tokens*`` measure the same).

    GPU g owns a block of experts with load share s_g. Dispatch sends its ``T k (1 - s_g)`` rows
    for experts elsewhere and receives ``(ep - 1) T k s_g`` rows for its own; combine returns them
    (the reverse); the backward runs both again, reversed. So each GPU sends and receives
    ``2 (T k (1 - s_g) + (ep - 1) T k s_g)`` rows.
    """
    ep = min(cfg.gpus, len(p_E))
    per = len(p_E) // ep
    slots, row = cfg.tokens_per_gpu * cfg.k, cfg.d_model * cfg.bytes_per_elem
    out = []
    for g in range(ep):
        s_g = sum(p_E[g * per : (g + 1) * per])
        rows = 2 * (slots * (1 - s_g) + (ep - 1) * slots * s_g)
        out.append((rows * row, rows * row))
    return out


def simulate_ep(load_LE: list[list[float]], cfg: SimConfig) -> Estimate:
    G, E, gpn = cfg.gpus, len(load_LE[0]), cfg.gpus_per_node
    ep = min(G, E)
    replicas = G // ep
    row = cfg.d_model * cfg.bytes_per_elem
    slots = cfg.tokens_per_gpu * cfg.k
    intra = (min(gpn, ep) - 1) / (ep - 1) if ep > 1 else 1.0
    tok = weight = comm = comp = strag = 0.0
    for p_E in load_LE:
        per = E // ep
        share_G = [sum(p_E[g * per : (g + 1) * per]) for g in range(ep)]
        sent = max(slots * (1 - s) for s in share_G) * row
        recv = max((ep - 1) * slots * s for s in share_G) * row
        layer_tok = 4 * max(sent, recv)
        expert_bytes = per * 3 * cfg.d_model * cfg.d_ff * cfg.bytes_per_elem
        layer_w = 2 * (replicas - 1) / replicas * expert_bytes if replicas > 1 else 0.0
        tok += layer_tok
        weight += layer_w
        comm += link_time(layer_tok, intra, cfg) + (link_time(layer_w, 0.0 if gpn < G else 1.0, cfg) if layer_w else 0.0)
        c_max, c_strag = _compute([ep * slots * s for s in share_G], cfg)
        comp += c_max
        strag += c_strag
    owned_state = (E // ep) * _expert_params(cfg) * (cfg.bytes_per_elem + 8) * len(load_LE)
    return Estimate(tok, weight, comm, comp, strag, owned_state)


def _expert_params(cfg: SimConfig) -> int:
    return 3 * cfg.d_model * cfg.d_ff


def fssdp_routing(p_E: list[float], holders_E: list[list[int]], cfg: SimConfig) -> tuple[list[float], list[float], list[float]]:
    """(slots sent off-GPU, slots received, slots computed) per GPU, as ``FSSDPRunner`` routes them."""
    G, gpn = cfg.gpus, cfg.gpus_per_node
    slots = cfg.tokens_per_gpu * cfg.k
    sent, recv, work = [0.0] * G, [0.0] * G, [0.0] * G
    for e, hs in enumerate(holders_E):
        hset = set(hs)
        for g in range(G):
            n = slots * p_E[e]
            if g in hset:
                work[g] += n
                continue
            near = [h for h in hs if h // gpn == g // gpn] or hs
            sent[g] += n
            for h in near:
                recv[h] += n / len(near)
                work[h] += n / len(near)
    return sent, recv, work


def simulate_fssdp(load_LE: list[list[float]], cfg: SimConfig) -> Estimate:
    """FSSDP over all GPUs, or (``fssdp_shard`` S < G) inside each group of S consecutive GPUs
    with the G/S groups as replicas: every group runs the same plan on its own tokens, and each
    owner then all-reduces its experts' gradients with its G/S - 1 twins (ring, 2 (R-1)/R)."""
    S = cfg.fssdp_shard or cfg.gpus
    if S < cfg.gpus:
        inner = simulate_fssdp(load_LE, SimConfig(**{**cfg.__dict__, "gpus": S, "fssdp_shard": 0}))
        R, E, gpn = cfg.gpus // S, len(load_LE[0]), cfg.gpus_per_node
        owned = max(initial_owners(E, S).count(g) for g in range(S))
        grads = 2 * (R - 1) / R * owned * 3 * cfg.d_model * cfg.d_ff * cfg.bytes_per_elem * len(load_LE)
        intra = max(0, min(gpn, cfg.gpus) // S - 1) / (R - 1)  # twins are S apart: some share the node
        comm = inner.comm_s + link_time(grads, intra, cfg)
        return Estimate(inner.token_bytes_max, inner.weight_bytes_max + grads, comm, inner.compute_max_s, inner.straggler_s, inner.expert_mem_max)
    G, E, gpn = cfg.gpus, len(load_LE[0]), cfg.gpus_per_node
    row = cfg.d_model * cfg.bytes_per_elem
    chunk = 3 * cfg.d_model * cfg.d_ff * cfg.bytes_per_elem
    owner = initial_owners(E, G)
    intra = (min(gpn, G) - 1) / (G - 1) if G > 1 else 1.0
    tok = weight = comm = comp = strag = mem = 0.0
    for p_E in load_LE:
        load_int = [round(p * 1_000_000) for p in p_E]
        holders = sparse_materialize(owner, load_int, cfg.t, cfg.m, G, gpn)
        held_G = [sum(1 for hs in holders if g in hs) for g in range(G)]
        owned_G = [owner.count(g) for g in range(G)]
        mem += max(o * (cfg.bytes_per_elem + 8) + (h - o) * cfg.bytes_per_elem for o, h in zip(owned_G, held_G)) * _expert_params(cfg)
        sent, recv, work = fssdp_routing(p_E, holders, cfg)
        layer_tok = 4 * max(max(sent), max(recv)) * row
        gathers = 2 if cfg.remat else 1
        w_sent = [0.0] * G  # owner side of spAG (and the receiving side of spRS)
        w_recv = [0.0] * G
        for e, hs in enumerate(holders):
            w_sent[owner[e]] += chunk * (len(hs) - 1)
            for h in hs:
                if h != owner[e]:
                    w_recv[h] += chunk
        # spAG: owner sends, holders receive (twice with remat); spRS: the reverse, once.
        layer_w = max(max(gathers * w_sent[g] + w_recv[g], gathers * w_recv[g] + w_sent[g]) for g in range(G))
        tok += layer_tok
        weight += layer_w
        comm += link_time(layer_tok, intra, cfg) + link_time(layer_w, intra, cfg)
        c_max, c_strag = _compute(work, cfg)
        comp += c_max
        strag += c_strag
    return Estimate(tok, weight, comm, comp, strag, mem)


def table(load_LE: list[list[float]], base: SimConfig, gpu_counts: list[int], shard_sizes: tuple[int, ...] = ()) -> str:
    """Markdown table: EP vs FSSDP (and hybrid FSSDP for each shard size below the GPU count)."""
    lines = [
        "| GPUs | mode | token a2a MB (max GPU) | expert weight/grad MB (max GPU) | comm ms | expert compute ms (max) | straggler ms | expert state GB (max GPU) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for G in gpu_counts:
        cfg = SimConfig(**{**base.__dict__, "gpus": G, "fssdp_shard": 0})
        rows = [("EP", simulate_ep(load_LE, cfg)), ("FSSDP", simulate_fssdp(load_LE, cfg))]
        rows += [(f"FSSDP shard_size={S}", simulate_fssdp(load_LE, SimConfig(**{**cfg.__dict__, "fssdp_shard": S}))) for S in shard_sizes if S < G]
        for mode, est in rows:
            lines.append(
                f"| {G} | {mode} | {est.token_bytes_max / 1e6:.1f} | {est.weight_bytes_max / 1e6:.1f} | "
                f"{est.comm_s * 1e3:.2f} | {est.compute_max_s * 1e3:.2f} | {est.straggler_s * 1e3:.2f} | {est.expert_mem_max / 1e9:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--metrics", help="metrics.jsonl of a real run (routing/layer*/tokens_per_expert)")
    src.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of the expert load (default 1.0)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    d = SimConfig(gpus=8)
    for name in ("gpus_per_node", "num_experts", "num_layers", "k", "d_model", "d_ff", "tokens_per_gpu", "bytes_per_elem", "t", "m"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("intra_gbps", "inter_gbps", "tflops"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--fssdp-shard", type=int, nargs="*", default=[], help="also simulate parallel.fssdp.shard_size=S (FSSDP groups of S GPUs, replicated)")
    args = ap.parse_args(argv)
    for S in args.fssdp_shard:
        if S < 1 or any(g % S for g in args.gpus if S < g):
            ap.error(f"--fssdp-shard ({S}) must be >= 1 and divide every --gpus count above it")
    for g in args.gpus:
        if not 1 <= g <= 4096:
            ap.error(f"--gpus ({g}) must be in [1, 4096]")
    base = SimConfig(gpus=args.gpus[0], remat=args.remat, **{k: getattr(args, k) for k in ("gpus_per_node", "num_experts", "num_layers", "k", "d_model", "d_ff", "tokens_per_gpu", "bytes_per_elem", "t", "m", "intra_gbps", "inter_gbps", "tflops")})
    loads = loads_from_metrics(args.metrics) if args.metrics else zipf_loads(args.num_experts, args.zipf, args.num_layers)
    print(table(loads, base, args.gpus, tuple(args.fssdp_shard)))


if __name__ == "__main__":
    main()
