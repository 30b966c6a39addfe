"""Permutation local search ("+" in COMET+, Ibrahim et al. KDD 2023, arXiv 2306.02824 §4).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, K slots (trees / selectors),
E experts, P learned permutations (1, or K with ``per_tree``).

A gate's slots map onto experts through a permutation ``P`` of the expert axis: a slot
distribution ``q`` (leaf / selector / softmax probabilities) becomes ``q P``, i.e. mass on leaf j
moves to expert ``perm[j]``. For the first ``window_steps`` optimizer steps ``P`` is a relaxed,
learnable doubly-stochastic matrix from log-domain Sinkhorn on ``L / tau_s`` (Mena et al. 2018,
Gumbel-Sinkhorn, without the noise), trained jointly with the rest of the model, with the
penalty ``penalty * [H(P) + H(rownorm(P))]`` pushing it towards a permutation. At the end of the
window it is projected once onto the nearest permutation, ``Hungarian(-P_soft)`` (scipy
``linear_sum_assignment``), and frozen: afterwards the integer permutation remaps expert ids
(no gradient). The projection is a checkpointable event: ``perm_PE`` and ``frozen`` are
persistent buffers, so a resumed run neither re-freezes nor changes the permutation.

Schedules (COMET's released ``perm_local_search``): ``tau_s`` log-linear from ``tau_start`` to
``tau_end`` and the Sinkhorn iteration count linear from ``iters_start`` to ``iters_end`` over
the window. At small ``tau`` Sinkhorn does not normalise rows exactly (it ends on the column
step), so ``mix`` rescales the permuted distribution to the mass it had before permuting.

Evaluation before the window ends uses the Hungarian projection of the current relaxed matrix
(inference always uses a hard permutation); it is computed on the fly and not stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from moe.errors import check
from moe.routers.smooth_gates import entropy


@dataclass(kw_only=True)
class LocalSearchConfig:
    enabled: bool = False
    """Learn a permutation of the expert axis during the first ``window_steps`` steps."""
    window_steps: int = 1000
    """Optimizer steps with the relaxed (Sinkhorn) permutation; frozen by Hungarian after."""
    tau_start: float = 1e-3
    """Sinkhorn temperature at step 0 (COMET: 1e-3)."""
    tau_end: float = 1e-7
    """Sinkhorn temperature at the last window step (COMET: 1e-7); log-linear in between."""
    iters_start: int = 20
    """Sinkhorn iterations at step 0 (COMET: 20)."""
    iters_end: int = 150
    """Sinkhorn iterations at the last window step (COMET: 150); linear in between."""
    penalty: float = 1e-4
    """Coefficient of the permutation entropy penalty H(P) + H(rownorm(P)) (COMET: 1e-4)."""
    per_tree: bool = False
    """One permutation per tree / selector (COMET's learn_k_permutations) instead of one shared."""

    def __post_init__(self) -> None:
        key = "router.local_search"
        check(self.window_steps >= 1, f"{key}.window_steps", self.window_steps, "must be >= 1")
        check(self.tau_start > 0, f"{key}.tau_start", self.tau_start, "must be > 0")
        check(self.tau_end > 0, f"{key}.tau_end", self.tau_end, "must be > 0")
        check(self.iters_start >= 1, f"{key}.iters_start", self.iters_start, "must be >= 1")
        check(self.iters_end >= 1, f"{key}.iters_end", self.iters_end, "must be >= 1")
        check(self.penalty >= 0, f"{key}.penalty", self.penalty, "must be >= 0")


def sinkhorn(log_alpha_PEE: Tensor, num_iters: int) -> Tensor:
    """Log-domain Sinkhorn normalisation (Sinkhorn 1964; Mena et al. 2018, eq. 5).

    Alternately subtracts the row and the column logsumexp ``num_iters`` times and returns
    ``exp``; the result's columns sum to 1 exactly, its rows approximately (converging as the
    iterations grow, slower at low temperature).
    """
    for _ in range(num_iters):
        log_alpha_PEE = log_alpha_PEE - torch.logsumexp(log_alpha_PEE, dim=-1, keepdim=True)
        log_alpha_PEE = log_alpha_PEE - torch.logsumexp(log_alpha_PEE, dim=-2, keepdim=True)
    return log_alpha_PEE.exp()


def hungarian(p_soft_PEE: Tensor) -> Tensor:
    """Nearest permutation of each matrix: ``perm_PE[p, j]`` maximises ``sum_j P[p, j, perm[j]]``.

    ``linear_sum_assignment(-P)`` (Kuhn-Munkres) on the host; called once per freeze.
    """
    perms = []
    for p_EE in p_soft_PEE.detach().double().cpu().numpy():
        rows, cols = linear_sum_assignment(-p_EE)
        assert np.array_equal(rows, np.arange(len(rows)))
        perms.append(torch.from_numpy(cols).long())
    return torch.stack(perms).to(p_soft_PEE.device)


def permutation_entropy(p_PEE: Tensor) -> Tensor:
    """``mean_p [H(P_p) + H(rownorm(P_p))]``, entropies summed over every entry (COMET+ penalty)."""
    rownorm_PEE = p_PEE / p_PEE.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (entropy(p_PEE, dim=(-2, -1)) + entropy(rownorm_PEE, dim=(-2, -1))).mean()


class PermutationLocalSearch(nn.Module):
    """Learned slot -> expert permutation(s) of one router; ``mix`` applies them."""

    def __init__(self, cfg: LocalSearchConfig, num_experts: int, num_slots: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_perms = num_slots if cfg.per_tree else 1
        E = num_experts
        self.log_weights_PEE = nn.Parameter(torch.empty(self.num_perms, E, E).uniform_(-0.05, 0.05))
        self.register_buffer("perm_PE", torch.arange(E).repeat(self.num_perms, 1))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._frozen_cache: bool | None = None  # host mirror of ``frozen``; None = read it once

    def is_frozen(self) -> bool:
        """Whether the hard permutation is final (reads the buffer once, then a host mirror)."""
        if self._frozen_cache is None:
            self._frozen_cache = bool(self.frozen)
        return self._frozen_cache

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen_cache = None

    def schedule(self, step: int) -> tuple[float, int]:
        """``(tau_s, n_it)`` at ``step``: log-linear temperature, linear iterations, clamped to the window."""
        frac = min(max(step / max(self.cfg.window_steps - 1, 1), 0.0), 1.0)
        log_tau = math.log(self.cfg.tau_start) + frac * (math.log(self.cfg.tau_end) - math.log(self.cfg.tau_start))
        iters = round(self.cfg.iters_start + frac * (self.cfg.iters_end - self.cfg.iters_start))
        return math.exp(log_tau), iters

    def soft(self, step: int) -> Tensor:
        """The relaxed permutation(s) ``P_PEE`` at ``step`` (differentiable in the log weights)."""
        tau, iters = self.schedule(step)
        return sinkhorn(self.log_weights_PEE.float() / tau, iters)

    def mix(self, dist_TKE: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``g_TE = sum_k dist_k P_k``, the slot distributions moved onto experts, and aux losses.

        In training before the freeze ``P`` is relaxed and the entropy penalty is returned;
        otherwise ``P`` is the hard permutation and the remap is an exact gather (no gradient to
        the permutation). The relaxed result is rescaled to the input's mass per token (Sinkhorn
        rows are only approximately normalised); a token whose permuted mass underflows to 0
        keeps its unpermuted distribution.
        """
        if self.is_frozen():
            return _apply_hard(dist_TKE, self.perm_PE), {}
        if not self.training:
            return _apply_hard(dist_TKE, hungarian(self.soft(step))), {}
        p_PEE = self.soft(step)
        moved_TE = torch.einsum("tke,kef->tf", dist_TKE.float(), p_PEE.expand(dist_TKE.shape[1], -1, -1))
        mass_T1 = dist_TKE.float().sum(dim=(1, 2)).unsqueeze(-1)
        moved_mass_T1 = moved_TE.sum(dim=-1, keepdim=True)
        ok_T1 = moved_mass_T1 > 0
        g_TE = torch.where(ok_T1, moved_TE * (mass_T1 / moved_mass_T1.clamp_min(1e-30)), dist_TKE.float().sum(dim=1))
        aux = {"perm_entropy": self.cfg.penalty * permutation_entropy(p_PEE)} if self.cfg.penalty > 0 else {}
        return g_TE, aux

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """At the first step ``>= window_steps - 1``: ``perm <- Hungarian(-P_soft)``, then frozen for good."""
        if self.is_frozen() or step < self.cfg.window_steps - 1:
            return
        self.perm_PE.copy_(hungarian(self.soft(step)))
        self.frozen.fill_(True)
        self._frozen_cache = True


def _apply_hard(dist_TKE: Tensor, perm_PE: Tensor) -> Tensor:
    """``g_TE[t, perm[k, j]] += dist[t, k, j]``: exact remap of leaf j to expert ``perm[j]``."""
    T, K, E = dist_TKE.shape
    inv_PE = torch.argsort(perm_PE, dim=-1)
    inv_KE = inv_PE.expand(K, E) if inv_PE.shape[0] == 1 else inv_PE
    return dist_TKE.gather(-1, inv_KE.unsqueeze(0).expand(T, K, E)).sum(dim=1)
