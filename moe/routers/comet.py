"""COMET tree gate (Ibrahim, Chen, Mazumder et al., KDD 2023, arXiv 2306.02824 §3).

Shape legend (of ``moe/routers``, ``moe.routers.interface``): T tokens, D model dim, E experts (=
leaves), K trees (= slots, ``router.k``), N internal nodes (E - 1), L tree levels: the root-to-leaf
path length, ``ceil(log2 E)``.

k soft binary trees, each with E leaves in heap layout: internal nodes 0..E-2 (children
``2i+1`` left, ``2i+2`` right), leaves E-1..2E-2, numbered onto experts 0..E-1 left to right
(depth-first order). For E not a power of two the leaves sit at depths ``L-1`` and ``L``. Each
internal node has one hyperplane per tree, ``s = S_gamma(w^T x + b)`` (smooth step); the
probability of leaf e in tree t is the product along its root path of ``s`` (left) or
``1 - s`` (right), so ``sum_e p_te = 1`` per tree. Each leaf has a logit ``a_te = v^T x + c``.

Combining (paper eq. 3-5): ``o_te = a_te + log p_te`` (``-inf`` where ``p_te < 1e-5``), one
softmax over all k*E scores ``q = softmax(o)``, an optional per-tree permutation of the expert
axis (``router.local_search``, COMET+), and ``g = sum_t q_t / sum_{t,e} q_te``. Once every split
is saturated each tree reaches exactly one leaf, so at most k experts get ``g > 0``; at
initialisation (splits near 1/2) every expert does. The regulariser ``lambda * sum_t
mean_T H(p_t)`` (aux loss ``comet_entropy``) pushes splits towards 0/1.

Checked against the authors' releases: ``mazumder-lab/COMET: model/gates/comet.py``
(``COMETGate``, TensorFlow, the paper's experiments) and the PyTorch port
``mazumder-lab/COMET-BERT: src/transformers/cometbert/gates/comet.py`` (``COMET``):

- heap layout, ``S_gamma`` splits, leaf probability products, ``o = a + log p`` with ``-inf``
  below 1e-5, one softmax over the k*E scores, the permutation, the final renormalisation, and
  the entropy regulariser ``lambda * mean_batch sum_t H(p_t)`` (summed leaf by leaf in the
  release): the same. The release logs ``log(p + 1e-6)``; here ``log p`` (p >= 1e-5 where kept).
- initialisation: split kernel *and* bias ``U(-gamma/100, gamma/100)``, leaf kernel *and* bias
  Keras ``RandomUniform()`` = ``U(-0.05, 0.05)``: the TF release (its ``Dense`` layers set
  ``bias_initializer`` to the same initialiser as the kernel). The PyTorch port drops the split
  bias and zeroes the leaf bias; we follow the TF release, which produced the paper's numbers.
- defaults: ``k = 2`` and ``gamma = 1`` are in the release's search grids
  (``config/model_config/movielens2M/comet.json``: k in {2}, gamma in {0.01, 0.1, 1, 5, 10},
  entropy_reg in {0.05, 0.1, 0.5, 1, 5, 10}); ``entropy_coef = 0.1`` is the second value of that
  grid (the paper tunes it per dataset; there is no single released default).
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
class CometConfig(KRouterConfig):
    name: str = "comet"
    k: int = 2
    """Number of trees; at most k experts per token once the splits are binary."""
    gamma: float = 1.0
    """Width of the smooth step's cubic band [-gamma/2, gamma/2] (release grid {0.01, 0.1, 1, 5, 10})."""
    entropy_coef: float = 0.1
    """lambda of the leaf-distribution entropy regulariser (release grid {0.05, 0.1, 0.5, 1, 5, 10})."""
    prob_floor: float = 1e-5
    """Leaves with path probability below this get score -inf (exact zero weight; release: 1e-5)."""
    leaf_init: float = 0.05
    """Leaf logit weights and biases start U(-leaf_init, leaf_init) (release: Keras RandomUniform, 0.05)."""
    local_search: LocalSearchConfig = field(default_factory=LocalSearchConfig)
    """Permutation local search of the leaf -> expert map (COMET+)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.gamma > 0, "router.gamma", self.gamma, "must be > 0")
        check(self.entropy_coef >= 0, "router.entropy_coef", self.entropy_coef, "must be >= 0")
        check(0 < self.prob_floor < 1, "router.prob_floor", self.prob_floor, "must be in (0, 1)")
        check(self.leaf_init >= 0, "router.leaf_init", self.leaf_init, "must be >= 0")

    def check_num_experts(self, num_experts: int) -> None:
        """At least two leaves, and ``k <= E``."""
        check(num_experts >= 2, "model.num_experts", num_experts, "must be >= 2 for the comet router")
        super().check_num_experts(num_experts)


def leaf_paths(num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Root paths of the E leaves of a heap-layout tree, leaves in left-to-right order.

    Returns ``node_EL`` (internal node index at each depth), ``left_EL`` (the path goes to the
    left child there) and ``valid_EL`` (False past a shallower leaf's depth), padded to depth L.
    """
    E = num_experts
    depth = max(math.ceil(math.log2(E)), 1)
    paths: list[list[tuple[int, bool]]] = []

    def walk(node: int, path: list[tuple[int, bool]]) -> None:
        if node >= E - 1:
            paths.append(path)
            return
        walk(2 * node + 1, path + [(node, True)])
        walk(2 * node + 2, path + [(node, False)])

    walk(0, [])
    assert len(paths) == E
    node_EL = torch.zeros(E, depth, dtype=torch.long)
    left_EL = torch.zeros(E, depth, dtype=torch.bool)
    valid_EL = torch.zeros(E, depth, dtype=torch.bool)
    for e, path in enumerate(paths):
        for d, (node, left) in enumerate(path):
            node_EL[e, d], left_EL[e, d], valid_EL[e, d] = node, left, True
    return node_EL, left_EL, valid_EL


def leaf_probs(s_TKN: Tensor, node_EL: Tensor, left_EL: Tensor, valid_EL: Tensor) -> Tensor:
    """``p_TKE``: product of ``s`` (left) / ``1 - s`` (right) along each leaf's root path."""
    s_TKEL = s_TKN[..., node_EL]
    f_TKEL = torch.where(left_EL, s_TKEL, 1.0 - s_TKEL)
    f_TKEL = torch.where(valid_EL, f_TKEL, torch.ones_like(f_TKEL))
    p_TKE = f_TKEL[..., 0]
    for d in range(1, f_TKEL.shape[-1]):
        p_TKE = p_TKE * f_TKEL[..., d]
    return p_TKE


def tree_scores(a_TKE: Tensor, p_TKE: Tensor, prob_floor: float) -> Tensor:
    """``o = a + log p`` with ``-inf`` where ``p < prob_floor``; never an all ``-inf`` row.

    Each tree's most probable leaf is always kept (its ``p >= 1/E``, so this only matters for
    E > 1/prob_floor), so the softmax over a token's k*E scores is always defined. The log is
    taken of a masked copy so dropped leaves pass no inf/NaN gradient.
    """
    top_TKE = nn.functional.one_hot(p_TKE.argmax(dim=-1), p_TKE.shape[-1]).bool()
    keep_TKE = (p_TKE >= prob_floor) | top_TKE
    log_p_TKE = torch.log(torch.where(keep_TKE, p_TKE, torch.ones_like(p_TKE)))
    return torch.where(keep_TKE, a_TKE + log_p_TKE, torch.full_like(a_TKE, float("-inf")))


class CometRouter(Router):
    """k smooth-step trees over E leaves; weights ``g`` with exact zeros (``mask_TK`` marks g > 0)."""

    Config = CometConfig
    cfg: CometConfig

    def __init__(self, cfg: CometConfig, d_model: int, num_experts: int) -> None:
        super().__init__(cfg, d_model, num_experts)
        E, K = num_experts, cfg.k
        self.split = nn.Linear(d_model, (E - 1) * K)  # one hyperplane per (internal node, tree)
        self.leaf = nn.Linear(d_model, E * K)  # one logit per (leaf, tree)
        nn.init.uniform_(self.split.weight, -cfg.gamma / 100, cfg.gamma / 100)
        nn.init.uniform_(self.split.bias, -cfg.gamma / 100, cfg.gamma / 100)
        nn.init.uniform_(self.leaf.weight, -cfg.leaf_init, cfg.leaf_init)
        nn.init.uniform_(self.leaf.bias, -cfg.leaf_init, cfg.leaf_init)
        node_EL, left_EL, valid_EL = leaf_paths(E)
        self.register_buffer("node_EL", node_EL, persistent=False)
        self.register_buffer("left_EL", left_EL, persistent=False)
        self.register_buffer("valid_EL", valid_EL, persistent=False)
        self.local_search = PermutationLocalSearch(cfg.local_search, E, K) if cfg.local_search.enabled else None

    def split_preactivations(self, x_TD: Tensor) -> Tensor:
        """``w^T x + b`` of every (tree, internal node): ``[T, K, N]`` in fp32."""
        h = nn.functional.linear(x_TD.float(), self.split.weight.float(), self.split.bias.float())
        return h.view(x_TD.shape[0], self.num_experts - 1, self.cfg.k).transpose(1, 2)

    def tree_probs(self, x_TD: Tensor) -> Tensor:
        """``p_TKE``: each tree's leaf distribution (sums to 1 over E)."""
        s_TKN = smooth_step(self.split_preactivations(x_TD), self.cfg.gamma)
        return leaf_probs(s_TKN, self.node_EL, self.left_EL, self.valid_EL)

    def leaf_logits(self, x_TD: Tensor) -> Tensor:
        """``a_TKE``: each tree's leaf logits."""
        a = nn.functional.linear(x_TD.float(), self.leaf.weight.float(), self.leaf.bias.float())
        return a.view(x_TD.shape[0], self.num_experts, self.cfg.k).transpose(1, 2)

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:
        T, K, E = x_TD.shape[0], self.cfg.k, self.num_experts
        p_TKE = self.tree_probs(x_TD)
        o_TKE = tree_scores(self.leaf_logits(x_TD), p_TKE, self.cfg.prob_floor)
        q_TKE = torch.softmax(o_TKE.reshape(T, K * E), dim=-1).view(T, K, E)
        aux: dict[str, Tensor] = {}
        if self.local_search is not None:
            g_TE, aux = self.local_search.mix(q_TKE, context.step)
        else:
            g_TE = q_TKE.sum(dim=1)
        g_TE = g_TE / g_TE.sum(dim=-1, keepdim=True)
        if self.cfg.entropy_coef > 0:
            aux["comet_entropy"] = self.cfg.entropy_coef * entropy(p_TKE).mean(dim=0).sum()
        return gate_decision(g_TE, aux)

    @torch.no_grad()
    def after_step(self, step: int, experts: nn.Module) -> None:
        if self.local_search is not None:
            self.local_search.after_step(step)
