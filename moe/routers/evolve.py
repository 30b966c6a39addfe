"""EvoMoE expert-diversify phase: train one base expert, then spawn E masked copies of it.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, F expert ffn
dim, E experts, K slots.

Nie et al., *EvoMoE* (arXiv 2112.14397), §3 "expert-diversify": the model first trains a single
FFN (the base expert) for ``base_steps`` optimizer steps; then every expert e is initialised as
``W_e = W_base ⊙ M_e`` with a Bernoulli keep-mask ``M_e`` (each weight dropped with probability
``mask_ratio``) and the gate is re-initialised, after which the DTS gate (``moe/routers/dts.py``)
anneals from dense to sparse.

Neither ``mask_ratio`` nor ``base_steps`` is released: codecaution/EvoMoE (the authors' fairseq
fork; checked: ``fairseq/modules/moe/*``, ``fairseq_cli/train.py``, ``fairseq/DTS_moe_checkpoint_utils.py``
and every launch script) has no spawning logic, and the stored paper text does not reach §3.
Both defaults were therefore chosen by sweeps, first on the clustered-regression toy (8 clusters, 8
experts, 500 steps, 3 seeds, k = 1 and k = 2; base phase 10/20/30/40% of the run x mask ratio
0.1/0.25/0.5/0.75, every arm reaching its hard top-k phase; docs/compare_routers/README.md,
"EvoMoE expert-diversify sweep"): the shortest base phase was best at both k (10%: held-out MSE
0.217 at k=1 and 0.127 at k=2 with mask 0.1, vs 0.262 / 0.166 at 20% and 0.325 / 0.187 at 40%),
while the mask ratio made no difference beyond the seed spread (10% base: 0.217 ± 0.066 to
0.287 ± 0.104 at k=1, 0.124 ± 0.058 to 0.161 ± 0.060 at k=2). On the byte LM (d_model 128, 2
layers, 8 experts of 64, top-2, 1,000 steps; docs/compare_routers/evomoe_sweep/lm*) the mask
ratio did matter: at a 10% base phase, 0.5 beat 0.1 on all three seeds (validation 1.677 ± 0.032
vs 1.754 ± 0.010 nats/byte, paired -0.077 ± 0.025), and a shorter base phase was better again
(seed 0, mask 0.1: 5% 1.732, 10% 1.766, 20% 1.825, 30% 1.860). Hence ``mask_ratio = 0.5`` and a
base phase of 10% of the run: ``base_steps = 1000`` is that share of a 10k-step run, so set it
to a tenth of ``train.steps`` (``tools/router_toys/specs.py`` does, ``BASE_FRACTION``).

Here the base phase is the router sending every token to expert 0 with weight 1, so experts
1..E-1 and the gate get no gradient until the spawn. The spawn masks every expert (expert 0
included) from a copy of expert 0's weights taken before any masking; masks are not rescaled by
``1/(1-mask_ratio)`` (the paper's ``W_base ⊙ M_e`` has no rescaling), so the layer's output scale
drops at the spawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.experts import EXPERT_WEIGHT_NAMES, Experts
from moe.routers.interface import RoutingDecision

# Seeds of the per-expert mask streams are ``seed * _SEED_STRIDE + e``; stream E re-initialises the gate.
_SEED_STRIDE = 1_000_003


@dataclass(kw_only=True)
class EvolveConfig:
    enabled: bool = False
    """Run the expert-diversify phase before the DTS gate (full EvoMoE); False = DTS from step 0."""
    base_steps: int = 1000
    """Optimizer steps trained with the single base expert before the spawn: 10% of the run (sweep, module docstring)."""
    mask_ratio: float = 0.5
    """Probability that a base weight is zeroed in each spawned expert (0.5: LM sweep, module docstring; not released)."""
    seed: int = 0
    """Seed of the spawn masks and of the re-initialised gate (same on every rank)."""

    def __post_init__(self) -> None:
        check(self.base_steps >= 1, "router.evolve.base_steps", self.base_steps, "must be >= 1")
        check(0.0 <= self.mask_ratio < 1.0, "router.evolve.mask_ratio", self.mask_ratio, "must be in [0, 1)")
        check(self.seed >= 0, "router.evolve.seed", self.seed, "must be >= 0")


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """CPU generator for stream ``stream`` of ``seed`` (expert e uses stream e, the gate stream E)."""
    return torch.Generator(device="cpu").manual_seed(seed * _SEED_STRIDE + stream)


def keep_mask(shape: torch.Size, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """Bernoulli keep-mask on CPU: each entry is 1 with probability ``1 - mask_ratio``."""
    return (torch.rand(shape, generator=generator) >= mask_ratio).float()


@torch.no_grad()
def spawn_experts(experts: Experts, cfg: EvolveConfig) -> None:
    """Overwrite every expert e with ``W_base ⊙ M_e``, ``W_base`` = expert 0's weights (EvoMoE §3).

    Masks are drawn on the CPU from ``stream_generator(cfg.seed, e)`` for global expert id e, so
    every rank and device builds the same experts, however they are split: each rank reads
    expert 0 (``Experts.read_expert``, a collective where experts are sharded) and rewrites only
    the rows it holds. Each of the three SwiGLU matrices gets its own mask, drawn in the order
    gate, up, down from expert e's stream.
    """
    base = experts.read_expert(0)
    gens: dict[int, torch.Generator] = {}
    for name, w_base in zip(EXPERT_WEIGHT_NAMES, base):
        ids, rows = experts.local_rows(name)
        for row, e in enumerate(ids):
            gen = gens.setdefault(e, stream_generator(cfg.seed, e))
            mask = keep_mask(w_base.shape, cfg.mask_ratio, gen).to(device=w_base.device, dtype=w_base.dtype)
            rows[row].copy_(w_base * mask)


def base_expert_decision(num_tokens: int, num_experts: int, device: torch.device) -> RoutingDecision:
    """Every token to expert 0 with weight 1: the single-FFN phase before the spawn."""
    ids_TK = torch.zeros(num_tokens, 1, dtype=torch.int64, device=device)
    probs_TE = torch.zeros(num_tokens, num_experts, device=device)
    probs_TE[:, 0] = 1.0
    return RoutingDecision(
        expert_ids_TK=ids_TK,
        weights_TK=torch.ones(num_tokens, 1, device=device),
        probs_TE=probs_TE,
    )
