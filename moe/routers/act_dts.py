"""Activation dense-to-sparse gate (Nguyen, Akbarian, Ho, ICML 2024).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts.

*Is Temperature Sample Efficient for Softmax Gaussian Mixture of Experts?* (arXiv 2401.13875,
PMLR v235 nguyen24a): the temperature gate ``softmax((β₁ᵀx + β₀)/τ)`` is invariant under
``(β, τ) → (cβ, cτ)``, which makes maximum-likelihood estimation of its parameters slower than
any polynomial rate; passing the logits through a nonlinear activation,
``softmax(σ(β₁ᵀx + β₀)/τ)``, breaks that symmetry and restores polynomial rates (their §3-4).

Here the change is exactly ``h ← σ(h)`` in front of the whole DTS logic of
``moe/routers/dts.py`` (research/routers.md §3): Gumbel scores ``softmax((σ(h) + g)/τ)``,
threshold, schedule, hard switch and combine weights ``softmax(σ(h))`` all use ``σ(h)``. With
``activation=identity`` the router is the DTS router, bit for bit.

Pitfall: a bounded σ caps the logit gap, so the largest weight ratio is
``exp((σ_max - σ_min)/τ)`` (tanh at τ = 0.5: e⁴ ≈ 55); real sparsity needs τ ≪ 1 or the hard
switch, hence the lower ``tau_min`` default than DTS.

No public code (the paper is theory with a simulation; the code index has no release), so there
is nothing to check the gate against beyond the paper's formula. Every default not listed in
``ActivationDTSConfig`` is DTS's (EvoMoE release values, ``moe/routers/dts.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe.errors import check
from moe.routers.dts import DTSConfig, DTSRouter

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda h_TE: h_TE,
}


@dataclass(kw_only=True)
class ActDTSConfig(DTSConfig):
    name: str = "act_dts"
    activation: str = "tanh"
    """σ applied to the gate logits: tanh | sigmoid | identity (identity = the DTS gate)."""
    bias: bool = False
    """Gate bias β₀ inside σ, the paper's ``σ(β₁ᵀx + β₀)`` (⚠ placement not checked in the full text)."""
    tau_min: float = 0.05
    """Temperature floor; lower than DTS because σ bounds the logit gap (see module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.activation in ACTIVATIONS, "router.activation", self.activation, f"must be one of {sorted(ACTIVATIONS)}")


class ActivationDTSRouter(DTSRouter):
    """The DTS router on activated logits ``σ(h)`` (Nguyen et al. 2024)."""

    Config = ActDTSConfig
    cfg: ActDTSConfig

    def gate_has_bias(self) -> bool:
        return self.cfg.bias

    def scores(self, h_TE: Tensor) -> Tensor:
        return ACTIVATIONS[self.cfg.activation](h_TE)
