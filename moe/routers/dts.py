"""EvoMoE Dense-To-Sparse gate (DTS-Gate), with the optional expert-diversify phase.

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts, K
slots.

Nie et al., *EvoMoE* (arXiv 2112.14397) §3, as released in codecaution/EvoMoE
(``fairseq/modules/moe/topkgate.py`` at d1e49d2; research/routers.md §2):

- logits ``h = x W_g`` in fp32; Gumbel-softmax ``Ĝ = softmax((h + g) / τ)`` with
  ``g ~ Gumbel(0, 1)`` per (token, expert) in training, ``g = 0`` in eval;
- soft phase: expert e is active for token t iff ``Ĝ_te > θ``; combine weights
  ``G = mask ⊙ softmax(h)`` (or ``mask ⊙ Ĝ`` with ``gumbel_weights``), not renormalised, so the
  kept mass is below 1. The decision has K = E slots and ``mask_TK`` marks the active ones
  (dispatch is dropless and honours the mask). ``θ < 1/E`` is enforced: at high τ every
  ``Ĝ ≈ 1/E``; and since ``max_e Ĝ_te ≥ 1/E > θ`` the argmax is always kept, so no token ever
  ends with zero experts (the argmax is also forced in explicitly, against rounding);
- τ annealed per optimizer step (linear or exponential, ``temperature``);
- from ``hard_step`` on: exactly the top-``k`` of the noisy scores ``h + g`` (k = 1 is the
  paper's hard Gumbel phase), weight ``softmax(h)`` there (or ``Ĝ``), K = k;
- balance loss ``l_aux = E² · mean_e(m_e · c_e)``, ``m_e`` = mean combine weight of e over
  tokens, ``c_e`` = share of tokens selecting e (the repo's ``l_aux``), times ``aux_loss_coef``.

With ``evolve.enabled`` the router first runs EvoMoE's expert-diversify phase
(``moe/routers/evolve.py``): every token goes to expert 0 until ``after_step`` spawns the experts
after step ``base_steps - 1``. The DTS step then counts from the spawn: the schedule and
``hard_step`` see ``step - base_steps`` (so ``tau_max`` is the first DTS step's temperature
whatever ``base_steps`` is). The ``spawned`` buffer is persistent, so a resumed run never spawns
twice.

Checked against codecaution/EvoMoE (the authors' fairseq fork): ``fairseq/modules/moe/topkgate.py``
(two stored versions: d1e49d2 as above; an older one with ``GUMBEL_THRESHOLD = 0.02``, Gumbel
weights and no ``l_aux``), ``fairseq_cli/train.py`` (the temperature schedule per update),
``fairseq/dataclass/configs.py`` (flag defaults) and the launch scripts. Defaults and where they
come from: ``threshold = 0.001`` (d1e49d2); ``tau_max = 2.0``, ``tau_min = 0.5``,
``decay_steps = 5000``, ``hard_step = 6000`` (``kdd_scripts/wmt14_*_gumbel.sh``; the GPT-tiny
scripts use 10.0 -> 0.01 over 50k, hard at 100k); ``aux_loss_coef = 0.01``
(``--moe-gate-loss-wt`` of ``scripts/pretrain_gpt_small_gumbel_MoE_balanced.sh``; 0 in the other
scripts); ``gumbel_weights = False`` (``--use-gumbel-gates`` is not set in the scripts); ``k = 1``
(the hard phase is top-1 in the release). The gate is ``torch.nn.Linear(D, E, bias=False)`` with
PyTorch's default init, ``U(-1/sqrt(D), 1/sqrt(D))`` (kaiming-uniform, a = sqrt(5)); ``reset_gate``
draws the same distribution (until this check it drew ``N(0, 1/D)``, sqrt(3) times wider, which
starts the soft phase with sharper logits than the release). Where we differ on purpose: the
release builds a T×E×T combine tensor for the dense phase (``torch.diag_embed``), here the decision
has K = E masked slots and dispatch is dropless; the release computes ``softmax(h).log()``, here
the Gumbel scores use ``h`` directly (the same softmax, without the underflow). The
expert-diversify phase is not in the release (``moe/routers/evolve.py`` says how its values were
chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe.dtensor_io import copy_full_
from moe.errors import check
from moe.routers.evolve import EvolveConfig, base_expert_decision, spawn_experts, stream_generator
from moe.routers.gate import gate_logits
from moe.routers.interface import KRouterConfig, Router, RouterContext, RoutingDecision

SCHEDULES = ("linear", "exponential")


@dataclass(kw_only=True)
class DTSConfig(KRouterConfig):
    name: str = "dts"
    k: int = 1
    """Experts per token after the hard switch (1 = the paper's hard Gumbel phase)."""
    schedule: str = "linear"
    """Temperature schedule: linear | exponential (research/routers.md §2)."""
    tau_max: float = 2.0
    """Temperature at DTS step 0 (EvoMoE WMT scripts: 2.0)."""
    tau_min: float = 0.5
    """Floor of the temperature, reached at ``decay_steps`` (WMT scripts: 0.5)."""
    decay_steps: int = 5000
    """DTS steps over which τ goes from tau_max to tau_min (WMT scripts: 5k)."""
    hard_step: int | None = 6000
    """DTS step from which routing is the hard top-k of the noisy scores; null = never (WMT: 6k)."""
    threshold: float = 0.001
    """θ: expert e is active iff Ĝ_te > θ; must be < 1/num_experts (repo HEAD: 0.001)."""
    gumbel_weights: bool = False
    """Combine with mask ⊙ Ĝ (``--use-gumbel-gates``) instead of mask ⊙ softmax(h)."""
    aux_loss_coef: float = 0.01
    """Coefficient of E²·mean_e(m_e·c_e) (``--moe-gate-loss-wt``, 0.01 in the 'balanced' GPT script)."""
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    """EvoMoE expert-diversify phase (single base expert, then masked spawn)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.schedule in SCHEDULES, "router.schedule", self.schedule, f"must be one of {list(SCHEDULES)}")
        check(self.tau_min > 0, "router.tau_min", self.tau_min, "must be > 0")
        check(self.tau_max >= self.tau_min, "router.tau_max", self.tau_max, f"must be >= router.tau_min ({self.tau_min})")
        check(self.decay_steps >= 1, "router.decay_steps", self.decay_steps, "must be >= 1")
        if self.hard_step is not None:
            check(self.hard_step >= 0, "router.hard_step", self.hard_step, "must be >= 0 (or null for never)")
        check(self.threshold >= 0, "router.threshold", self.threshold, "must be >= 0")
        check(self.aux_loss_coef >= 0, "router.aux_loss_coef", self.aux_loss_coef, "must be >= 0")

    def check_num_experts(self, num_experts: int) -> None:
        """``k <= E``, and ``θ < 1/E`` (module docstring)."""
        super().check_num_experts(num_experts)
        check(
            self.threshold < 1.0 / num_experts,
            "router.threshold",
            self.threshold,
            f"must be < 1/model.num_experts (model.num_experts = {num_experts}, 1/E = {1.0 / num_experts:.4g}); "
            "at high temperature every Gumbel-softmax score is about 1/E",
        )


def temperature(step: int, schedule: str, tau_max: float, tau_min: float, decay_steps: int) -> float:
    """Gumbel-softmax temperature after ``step`` DTS updates (EvoMoE ``fairseq_cli/train.py``).

    linear:      ``max(tau_max - step * (tau_max - tau_min) / decay_steps, tau_min)``
    exponential: ``max(tau_max * exp(step * ln(tau_min / tau_max) / decay_steps), tau_min)``
    """
    step = max(step, 0)
    if schedule == "linear":
        tau = tau_max - step * (tau_max - tau_min) / decay_steps
    elif schedule == "exponential":
        tau = tau_max * math.exp(step * math.log(tau_min / tau_max) / decay_steps)
    else:
        raise AssertionError(f"unknown schedule {schedule!r}")  # rejected by DTSConfig
    return max(tau, tau_min)


def gumbel_noise(like_TE: Tensor) -> Tensor:
    """Samples of Gumbel(0, 1) shaped like ``like_TE``: ``g = -ln(X)``, ``X ~ Exp(1)``."""
    exp_TE = torch.empty_like(like_TE).exponential_()
    return -torch.log(exp_TE.clamp_min(torch.finfo(exp_TE.dtype).tiny))


def dts_decision(
    h_TE: Tensor, tau: float, cfg: DTSConfig, hard: bool, noisy: bool
) -> RoutingDecision:
    """The DTS decision for scores ``h_TE`` at temperature ``tau`` (formulas in the module docstring).

    ``hard`` selects the top-``cfg.k`` phase; ``noisy`` adds Gumbel noise (training).
    """
    T, E = h_TE.shape
    noisy_TE = h_TE + gumbel_noise(h_TE) if noisy else h_TE
    ghat_TE = torch.softmax(noisy_TE / tau, dim=-1)
    probs_TE = torch.softmax(h_TE, dim=-1)
    source_TE = ghat_TE if cfg.gumbel_weights else probs_TE
    if hard:
        # Top-k of the noisy scores, not of Ĝ: same order, but Ĝ underflows to ties at small τ.
        ids_TK = torch.topk(noisy_TE, cfg.k, dim=-1).indices
        weights_TK = source_TE.gather(1, ids_TK)
        mask_TK = None
        chosen_TE = torch.zeros_like(probs_TE).scatter_(1, ids_TK, 1.0)
        weights_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, weights_TK)
    else:
        argmax_T1 = noisy_TE.argmax(dim=-1, keepdim=True)
        mask_TK = (ghat_TE > cfg.threshold).scatter(1, argmax_T1, True)
        ids_TK = torch.arange(E, device=h_TE.device).expand(T, E).contiguous()
        weights_TK = source_TE * mask_TK
        chosen_TE, weights_TE = mask_TK.float(), weights_TK
    aux: dict[str, Tensor] = {}
    if cfg.aux_loss_coef > 0:
        m_E, c_E = weights_TE.mean(dim=0), chosen_TE.mean(dim=0)
        aux["aux_loss"] = cfg.aux_loss_coef * E * E * torch.mean(m_E * c_E)
    return RoutingDecision(
        expert_ids_TK=ids_TK,
        weights_TK=weights_TK,
        probs_TE=probs_TE,
        mask_TK=mask_TK,
        aux_losses=aux,
        extras={"temperature": tau, "threshold": cfg.threshold},
    )


class DTSRouter(Router):
    """EvoMoE DTS-Gate: Gumbel-softmax threshold gate annealed from dense to sparse, then hard top-k."""

    Config = DTSConfig
    cfg: DTSConfig

    def __init__(self, cfg: DTSConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        self.gate = nn.Linear(d_model, num_experts, bias=self.gate_has_bias())
        self.reset_gate()
        if cfg.evolve.enabled:
            self.register_buffer("spawned", torch.zeros((), dtype=torch.bool))

    def gate_has_bias(self) -> bool:
        """Whether the gate has a bias (none here; activation DTS may put one inside σ)."""
        return False

    def reset_gate(self, generator: torch.Generator | None = None) -> None:
        """``W_g ~ U(-1/sqrt(D), 1/sqrt(D))`` (the release's ``nn.Linear`` default), bias 0; on the CPU when seeded."""
        bound = self.d_model**-0.5
        w = (torch.rand(self.gate.weight.shape, generator=generator) * 2 - 1) * bound
        copy_full_(self.gate.weight, w)  # an FSDP2 shard under parallel=fsdp
        if self.gate.bias is not None:
            copy_full_(self.gate.bias, torch.zeros(self.gate.bias.shape))

    def scores(self, h_TE: Tensor) -> Tensor:
        """Map gate logits to the scores the DTS logic runs on (identity here; σ in activation DTS)."""
        return h_TE

    def dts_step(self, step: int) -> int:
        """Step of the DTS schedule: counts from the spawn when the evolve phase is on."""
        return step - self.cfg.evolve.base_steps if self.cfg.evolve.enabled else step

    def in_base_phase(self) -> bool:
        """True while the evolve phase is on and the experts have not been spawned yet."""
        return self.cfg.evolve.enabled and not bool(self.spawned)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        if self.in_base_phase():
            return base_expert_decision(x_TD.shape[0], self.num_experts, x_TD.device)
        cfg = self.cfg
        s = self.dts_step(context.step)
        tau = temperature(s, cfg.schedule, cfg.tau_max, cfg.tau_min, cfg.decay_steps)
        bias = None if self.gate.bias is None else self.gate.bias.float()
        h_TE = gate_logits(x_TD, self.gate.weight, bias)
        hard = cfg.hard_step is not None and s >= cfg.hard_step
        return dts_decision(self.scores(h_TE), tau, cfg, hard=hard, noisy=self.training)

    @torch.no_grad()
    def after_step(self, step: int, experts: nn.Module) -> None:
        """Spawn the experts once, after the last base step (EvoMoE expert-diversify).

        Fires at the first call with ``step >= base_steps - 1`` while ``spawned`` is False, so a
        missed call cannot leave the model in the base phase; never again once spawned.
        """
        evolve = self.cfg.evolve
        if evolve.enabled and step >= evolve.base_steps - 1 and not bool(self.spawned):
            spawn_experts(experts, evolve)
            self.reset_gate(stream_generator(evolve.seed, self.num_experts))
            self.spawned.fill_(True)
