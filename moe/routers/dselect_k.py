"""DSelect-k gate (Hazimeh et al., NeurIPS 2021, arXiv 2106.03760 §3).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts, K
single-expert selectors (= slots, ``router.k``), M binary code length ``ceil(log2 E)``.

Expert e has the M-bit binary code of e (most significant bit first). Selector i reads
per-token code logits ``z_i = W_z x + b in R^M`` and puts weight
``r_ie = prod_l S_gamma(z_il)^[bit_l(e)=1] * (1 - S_gamma(z_il))^[bit_l(e)=0]`` on expert e
(paper eq. 6, smooth step S_gamma); selector weights ``alpha = softmax(W_a x + c)`` over the k
selectors give ``g = sum_i alpha_i r_i`` (eq. 7). When every ``z`` is saturated each selector is
one-hot, so at most k experts get ``g > 0``.

For E a power of two every code is an expert and each ``r_i`` sums to 1, so ``g`` does too. For
other E the codes E..2^M-1 are unreachable: their mass is lost (``g`` sums to less than 1 until
the selectors avoid them) and the paper's reachability loss ``sum_i 1 / sum_{e<E} r_ie``
(aux ``dselect_reachability``, mean over tokens, minus its minimum k so it reads 0 once every
selector is on reachable codes; same gradient) pushes the mass back; the combine weights are
``g`` as is, not renormalised. The optional entropy loss ``lambda * sum_i mean_T H(r_i)``
(aux ``dselect_entropy``) speeds up convergence to k nonzeros.

Checked against the authors' release, ``google-research/google-research:
dselect_k_moe/dselect_k_moe.py`` (``SmoothStep``, ``EntropyRegularizer``, ``DSelectKGate``;
per-example path ``_compute_example_conditioned_expert_weights``):

- smooth step, binary codes (``np.binary_repr``, most significant bit first; bit 1 -> ``S(z)``,
  bit 0 -> ``1 - S(z)``), ``g = sum_i softmax(alpha)_i r_i``: the same;
- ``gamma = 1`` and the code-logit init ``U(-gamma/100, gamma/100)`` for kernel *and* bias: the
  release's defaults; ``alpha_init = 0.05``: its selector-weight init is Keras ``RandomUniform()``,
  whose default range is ``(-0.05, 0.05)``, for kernel and bias;
- entropy: the release's regulariser is *optional* (``entropy_reg=None`` by default) with a
  schedule whose default value is 1e-6, and sums ``-r log(r + 1e-6)`` over the batch, the selectors
  and the experts; here it is off by default too (``entropy_coef = 0``) and is a mean over tokens
  (a sum over tokens would tie the coefficient to the batch size). Without it the codes only leave
  the cubic band by gradient drift, slowly (on the toy regression, dense 8/8 for 500 steps), which
  is the release's behaviour as well: turn it on to get sparsity within a short run;
- reachability: the release adds ``sum 1/sum_{e<E} r`` (coefficient 1) for E not a power of two,
  summed over the batch; here a mean over tokens (same reason), minus its constant minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe.errors import check
from moe.routers.interface import KRouterConfig, Router, RouterContext, RoutingDecision
from moe.routers.local_search import LocalSearchConfig, PermutationLocalSearch
from moe.routers.smooth_gates import entropy, gate_decision, smooth_step


@dataclass(kw_only=True)
class DSelectKConfig(KRouterConfig):
    name: str = "dselect_k"
    k: int = 2
    """Number of single-expert selectors; at most k experts per token once the codes are binary."""
    gamma: float = 1.0
    """Width of the smooth step's cubic band [-gamma/2, gamma/2] (release default ``gamma = 1.0``)."""
    entropy_coef: float = 0.0
    """lambda of the selector entropy regulariser, per token; 0 disables it (release: optional, off by default)."""
    reachability_coef: float = 1.0
    """Coefficient of sum_i 1/sum_{e<E} r_ie when E is not a power of two (release: 1, added unscaled)."""
    alpha_init: float = 0.05
    """Selector-weight logits (W_a, c) start U(-alpha_init, alpha_init) (Keras RandomUniform default)."""
    local_search: LocalSearchConfig = field(default_factory=LocalSearchConfig)
    """Permutation local search of the code -> expert map (the COMET+ wrapper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.gamma > 0, "router.gamma", self.gamma, "must be > 0")
        check(self.entropy_coef >= 0, "router.entropy_coef", self.entropy_coef, "must be >= 0")
        check(self.reachability_coef >= 0, "router.reachability_coef", self.reachability_coef, "must be >= 0")
        check(self.alpha_init >= 0, "router.alpha_init", self.alpha_init, "must be >= 0")

    def check_num_experts(self, num_experts: int) -> None:
        """At least two experts (a code of one bit or more), and ``k <= E``."""
        check(num_experts >= 2, "model.num_experts", num_experts, "must be >= 2 for the dselect_k router")
        super().check_num_experts(num_experts)


def binary_codes(num_experts: int) -> Tensor:
    """Bool ``[E, M]``: row e is e in binary, most significant bit first (M = ceil(log2 E))."""
    M = max(math.ceil(math.log2(num_experts)), 1)
    e_E1 = torch.arange(num_experts).unsqueeze(-1)
    shifts_M = torch.arange(M - 1, -1, -1)
    return ((e_E1 >> shifts_M) & 1).bool()


def selector_outputs(s_TKM: Tensor, codes_EM: Tensor) -> Tensor:
    """``r_TKE``: each selector's weight on each expert, ``prod_l s or (1 - s)`` by code bit."""
    f_TKEM = torch.where(codes_EM, s_TKM.unsqueeze(2), 1.0 - s_TKM.unsqueeze(2))
    r_TKE = f_TKEM[..., 0]
    for m in range(1, f_TKEM.shape[-1]):
        r_TKE = r_TKE * f_TKEM[..., m]
    return r_TKE


class DSelectKRouter(Router):
    """k binary-code selectors mixed by a softmax; weights with exact zeros (``mask_TK`` marks g > 0)."""

    Config = DSelectKConfig
    cfg: DSelectKConfig

    def __init__(self, cfg: DSelectKConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        codes_EM = binary_codes(num_experts)
        self.code_len = codes_EM.shape[1]
        self.z = nn.Linear(d_model, cfg.k * self.code_len)
        self.alpha = nn.Linear(d_model, cfg.k)
        nn.init.uniform_(self.z.weight, -cfg.gamma / 100, cfg.gamma / 100)
        nn.init.uniform_(self.z.bias, -cfg.gamma / 100, cfg.gamma / 100)
        nn.init.uniform_(self.alpha.weight, -cfg.alpha_init, cfg.alpha_init)
        nn.init.uniform_(self.alpha.bias, -cfg.alpha_init, cfg.alpha_init)
        self.register_buffer("codes_EM", codes_EM, persistent=False)
        self.power_of_two = num_experts == 2**self.code_len
        self.local_search = PermutationLocalSearch(cfg.local_search, num_experts, cfg.k) if cfg.local_search.enabled else None

    def code_logits(self, x_TD: Tensor) -> Tensor:
        """``z_TKM`` in fp32."""
        z = nn.functional.linear(x_TD.float(), self.z.weight.float(), self.z.bias.float())
        return z.view(x_TD.shape[0], self.cfg.k, self.code_len)

    def selectors(self, x_TD: Tensor) -> Tensor:
        """``r_TKE``: the k single-expert selectors (each sums to 1 when E is a power of two)."""
        return selector_outputs(smooth_step(self.code_logits(x_TD), self.cfg.gamma), self.codes_EM)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        r_TKE = self.selectors(x_TD)
        alpha_TK = torch.softmax(nn.functional.linear(x_TD.float(), self.alpha.weight.float(), self.alpha.bias.float()), dim=-1)
        weighted_TKE = alpha_TK.unsqueeze(-1) * r_TKE
        aux: dict[str, Tensor] = {}
        if self.local_search is not None:
            g_TE, aux = self.local_search.mix(weighted_TKE, context.step)
        else:
            g_TE = weighted_TKE.sum(dim=1)
        if self.cfg.entropy_coef > 0:
            aux["dselect_entropy"] = self.cfg.entropy_coef * entropy(r_TKE).mean(dim=0).sum()
        if not self.power_of_two and self.cfg.reachability_coef > 0:
            reach_TK = r_TKE.sum(dim=-1).clamp_min(1e-6)
            aux["dselect_reachability"] = self.cfg.reachability_coef * (1.0 / reach_TK - 1.0).sum(dim=-1).mean()
        probs_TE = g_TE / g_TE.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return gate_decision(g_TE, aux, probs_TE=probs_TE)

    @torch.no_grad()
    def after_step(self, step: int, experts: nn.Module) -> None:
        if self.local_search is not None:
            self.local_search.after_step(step)
