"""Past one GPU, on paper: a layout on G GPUs = one rank's counted step plus the communication it adds.

Usage::

    python -m tools.bench.step_parallel model=olmoe_1b_7b train.batch_size=64 train.seq_len=4096 --gpus 8 --card h100
    python -m tools.bench.step_parallel model=mixtral_8x7b train.batch_size=512 train.seq_len=4096 --gpus 64 --layout ep

Per GPU, the step is the one ``tools.bench.step_budget`` counts for one rank's share of the batch
(``train.batch_size / G`` sequences) on a single device, with two corrections for the layout:

- parameters held: expert weights are split over ``ep`` GPUs (``parallel=ep``, ``ep = min(G, E)``)
  or over the FSSDP group (``parallel=fssdp``, plus up to ``memory_cap`` gathered experts per
  layer), dense weights are replicated (``parallel.dense=ddp``). The optimizer's and gradient
  clipping's traffic and launches, and the parameter, gradient and optimizer-state memory, scale
  with the fraction of parameters a GPU holds (expert compute does not: with balanced routing a
  GPU computes as many expert rows as its own tokens route, wherever the experts live).
- communication, from ``tools.simulate_parallel``'s model for the stated cluster (NVLink inside a
  node of ``gpus_per_node``, one InfiniBand NIC per GPU between nodes; ``tools.bench.card_rates``):
  token all-to-alls (``ep_token_bytes`` for EP, ``simulate_fssdp`` for FSSDP), expert weight and
  gradient traffic, and the ring all-reduce of the dense gradients (fp32, ``2 (G-1)/G`` of their
  bytes). All of it is counted as exposed (no overlap with compute): an upper bound on its cost.

Routing is taken balanced (uniform over experts) unless ``--zipf S`` gives a skew; the slowest
GPU's compute excess over the mean is added as straggler time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from tools.bench.card_rates import CARDS
from tools.bench.step_budget import compose_job, count_step, predict, report
from tools.simulate_parallel import SimConfig, ep_token_bytes, link_time, normalise, simulate_ep, simulate_fssdp, zipf_loads

LAYOUTS = ("ep", "fssdp", "fssdp_node")
"""``ep``: parallel=ep, ep_size = min(G, E); ``fssdp``: FSSDP over all G; ``fssdp_node``: FSSDP inside each
node (``parallel.fssdp.shard_size`` = GPUs per node), nodes replicated."""


def _param_split(job: Any) -> tuple[int, int]:
    """(expert parameters, other parameters) of the job's model."""
    import torch

    from moe.model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(job.model, job.router, job.experts)
    expert = sum(p.numel() for _, layer in model.moe_layers() for p in layer.experts.parameters())
    return expert, sum(p.numel() for p in model.parameters()) - expert


def predict_layout(overrides: list[str], gpus: int, layout: str, card: str = "h100", gpus_per_node: int = 8,
                   zipf: float | None = None) -> dict[str, Any]:
    """Per-GPU prediction of ``overrides`` on ``gpus`` GPUs of ``card`` in ``layout`` (module docstring)."""
    job = compose_job(overrides)
    tr, m = job.train, job.model
    if tr.batch_size % gpus:
        raise ValueError(f"train.batch_size ({tr.batch_size}) must be divisible by --gpus ({gpus})")
    rank_overrides = [o for o in overrides if not o.startswith("parallel")] + [f"train.batch_size={tr.batch_size // gpus}"]
    count = count_step(rank_overrides, card)
    rates = CARDS[card]
    expert_p, dense_p = _param_split(job)
    E, L = m.num_experts, len([i for i in range(m.num_layers) if (i + 1) % m.moe_every == 0])
    k = job.router.experts_per_token
    loads = zipf_loads(E, zipf, L) if zipf else [normalise([1.0] * E) for _ in range(L)]
    sim = SimConfig(gpus=gpus, gpus_per_node=min(gpus_per_node, gpus), num_experts=E, num_layers=L, k=k, d_model=m.d_model,
                    d_ff=m.d_ff, tokens_per_gpu=tr.batch_size // gpus * tr.seq_len, bytes_per_elem=2,
                    intra_gbps=rates.nvlink_gbps, inter_gbps=rates.ib_gbps,
                    tflops=rates.grouped_gemm_tflops, t=job.parallel.fssdp.overlap_degree, m=job.parallel.fssdp.memory_cap)
    gpn = sim.gpus_per_node
    gathered_gb = 0.0
    if layout == "ep":
        ep = min(gpus, E)
        replicas = gpus // ep
        held_experts = expert_p / ep
        intra = (min(gpn, ep) - 1) / (ep - 1) if ep > 1 else 1.0
        token_s = sum(link_time(max(max(sent, recv) for sent, recv in ep_token_bytes(p, sim)), intra, sim) for p in loads)
        grads = 2 * (replicas - 1) / replicas * held_experts * 4 if replicas > 1 else 0.0  # fp32 expert grads over the replicas
        comm_s = token_s + link_time(grads, 1.0 if ep * replicas <= gpn else 0.0, sim)
        straggler_s = simulate_ep(loads, sim).straggler_s
        layout_desc = f"parallel=ep parallel.ep_size={ep}"
    else:
        shard = gpn if layout == "fssdp_node" and gpus > gpn else 0
        group = shard or gpus
        est = simulate_fssdp(loads, dataclasses.replace(sim, fssdp_shard=shard))
        held_experts = expert_p / group
        extra = min(sim.m, E - E // group) if group > 1 else 0  # gathered (non-owned) experts per layer, at most memory_cap
        gathered_gb = L * extra * 3 * m.d_model * m.d_ff * 8 / 1e9  # fp32 weights and their gradients
        comm_s, straggler_s = est.comm_s, est.straggler_s
        layout_desc = "parallel=fssdp" + (f" parallel.fssdp.shard_size={shard}" if shard else "") + (
            f" parallel.fssdp.memory_cap={sim.m}" if sim.m != 2 else "")
    dense_bytes = dense_p * 4
    ring = 2 * (gpus - 1) / gpus * dense_bytes if gpus > 1 else 0.0
    dense_s = link_time(ring, 1.0 if gpus <= gpus_per_node else 0.0, sim)
    held = (held_experts + dense_p) / (expert_p + dense_p)

    pred = predict(count, rates)
    rep = report(count, pred)
    scaled_ms = 0.0
    for name in ("optimizer", "grad clip"):
        row = rep["components"][name]
        scaled_ms += row["ms"] * (1 - held)
    step_ms = pred.step_ms - scaled_ms + (comm_s + dense_s + straggler_s) * 1e3
    # memory: each phase's peak with what scales with the parameters held scaled (parameters, their
    # gradients, optimizer state and the optimizer's and clipping's temporaries), the largest wins
    scaled = ("parameters", "optimizer state", "optimizer temporaries", "clip temporaries")
    phases = []
    for split in count.phase_peaks.values():
        gb = {k: v / 1e9 for k, v in split.items()}
        param_gb = gb.get("parameters", 0.0)
        for key in scaled:
            if key in gb:
                gb[key] *= held
        if "gradients and backward buffers" in gb:
            gb["gradients and backward buffers"] = max(0.0, gb["gradients and backward buffers"] - (1 - held) * param_gb)
        if gathered_gb:
            gb["gathered experts"] = gathered_gb
        phases.append(gb)
    mem = max(phases, key=lambda gb: sum(gb.values()))
    peak = sum(mem.values())
    tokens = count.tokens
    return {
        "layout": layout_desc, "gpus": gpus, "gpus_per_node": gpus_per_node, "card": card,
        "activation_checkpointing": tr.activation_checkpointing, "tokens_per_gpu": tokens,
        "step_ms": step_ms, "compute_ms": pred.step_ms - scaled_ms, "comm_ms": (comm_s + dense_s) * 1e3, "straggler_ms": straggler_s * 1e3,
        "tokens_per_s_per_gpu": tokens / (step_ms / 1e3), "tokens_per_s": tokens / (step_ms / 1e3) * gpus,
        "mfu": count.formula_flops / (step_ms / 1e3) / (rates.peak_bf16_tflops * 1e12),
        "memory_gb": {**mem, "peak": peak}, "fits": peak <= rates.memory_gb, "held_fraction": held,
    }


def recommend(overrides: list[str], gpus: int, card: str = "h100", gpus_per_node: int = 8) -> dict[str, Any]:
    """The layout and recomputation with the most tokens/s that fits the card's memory (or the
    smallest-memory one, marked ``fits: False``, when none fits). Tried: every layout of
    ``LAYOUTS`` (FSSDP also with ``parallel.fssdp.memory_cap=0``: no gathered copies) under
    ``train.activation_checkpointing`` none, selective and full."""
    tried = []
    for ac in ("none", "selective", "full"):
        for layout in LAYOUTS:
            if layout == "fssdp_node" and gpus <= gpus_per_node:
                continue
            for extra in ([[]] if layout == "ep" else [[], ["parallel.fssdp.memory_cap=0"]]):
                tried.append(predict_layout([*overrides, *extra, f"train.activation_checkpointing={ac}"], gpus, layout, card, gpus_per_node))
    fitting = [t for t in tried if t["fits"]]
    if fitting:
        return max(fitting, key=lambda t: t["tokens_per_s"])
    return min(tried, key=lambda t: t["memory_gb"]["peak"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.step_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--card", choices=sorted(CARDS), default="h100")
    parser.add_argument("--layout", choices=(*LAYOUTS, "recommend"), default="recommend")
    parser.add_argument("--zipf", type=float, default=None, help="Zipf exponent of the expert load (default: balanced)")
    args = parser.parse_intermixed_args(argv)
    if args.layout == "recommend":
        out = recommend(args.overrides, args.gpus, args.card, args.gpus_per_node)
    else:
        out = predict_layout(args.overrides, args.gpus, args.layout, args.card, args.gpus_per_node, args.zipf)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
