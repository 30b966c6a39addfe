"""The router seam: ``router(x_TD, context) -> RoutingDecision``, and the base of every router's
config (``RouterConfig``).

Shape legend of ``moe/routers``: a tensor's name ends in one letter per dimension; a digit is a
literal size (``alpha_T1`` is ``[T, 1]``). Each letter means one thing in every file of this package;
those it shares with ``moe``'s legend (``moe/__init__.py``) mean the same there, except C, G, H, P.

- ``B`` batch: sequences in one forward.
- ``S`` sequence: positions in one forward.
- ``T`` tokens: ``B*S`` flattened, batch-major.
- ``D`` model dim.
- ``V`` vocabulary.
- ``F`` hidden width of an expert.
- ``E`` experts.
- ``K`` slots per token: the routing choices one token may use (COMET's trees, DSelect-k's selectors).
- ``A`` slots of the forward: ``T*K``, flattened token-major.
- ``C`` tokens per expert: the capacity of expert choice and of BASE layers.
- ``G`` expert groups (DeepSeek-V3 group-limited routing).
- ``R`` similarity rank (``router.d_sim``).
- ``M`` binary code length ``ceil(log2 E)`` (DSelect-k).
- ``N`` internal tree nodes, ``E - 1`` (COMET).
- ``L`` tree levels: the root-to-leaf path length, ``ceil(log2 E)`` (COMET).
- ``P`` learned permutations of the expert axis (local search: 1, or K with ``per_tree``).
- ``H`` hash-table entries (``router.table_size``).
- ``Z`` auction seats, ``E*C`` (BASE layers).
- ``U`` tokens bidding in an auction round (BASE layers).
- ``W`` a round's offers: the seats' prices and the new bids, ``Z + U`` (BASE layers).

Every router is an ``nn.Module`` whose forward takes the MoE layer's input ``x_TD`` and a
``RouterContext`` and returns a ``RoutingDecision``. Routers compute in fp32 and never touch
expert weights. A router that gives a variable number of experts per token (DTS, expert choice)
returns K = the most slots any token may use and marks the used ones in ``mask_TK``; dispatch is
dropless so every marked slot reaches its expert.

Each router's config derives from ``RouterConfig`` (routers that send a token to ``k`` experts from
``KRouterConfig``, which holds ``k`` and its checks), so the job and the model read any router's
config through these two classes and never by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe.errors import check


@dataclass(kw_only=True)
class RouterConfig:
    """Base of every router's config (a Hydra structured config: ``conf/router/<name>.yaml``).

    Subclasses add their fields and check them in ``__post_init__`` (calling this one's first);
    rules that need ``model.num_experts`` go in ``check_num_experts``, which the job runs before
    anything is built and the router runs again when it is built.
    """

    name: str
    """The router's registry name (``moe.routers.ROUTERS``); each subclass sets its own."""

    def __post_init__(self) -> None:
        """Checks of the config's own fields; none here."""

    @property
    def experts_per_token(self) -> int:
        """Routed experts one token uses, nominally (FLOP and active-parameter counts): 1 here."""
        return 1

    def check_num_experts(self, num_experts: int) -> None:
        """Rules between this config and ``model.num_experts`` (one ConfigError naming the key); none here."""


@dataclass(kw_only=True)
class KRouterConfig(RouterConfig):
    """Config of a router that sends each token to ``k`` experts (after any dense phase: DTS)."""

    k: int = 2
    """Experts per token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k >= 1, "router.k", self.k, "must be >= 1")

    @property
    def experts_per_token(self) -> int:
        """``k``."""
        return self.k

    def check_num_experts(self, num_experts: int) -> None:
        super().check_num_experts(num_experts)
        check(self.k <= num_experts, "router.k", self.k, f"must be <= model.num_experts ({num_experts})")


@dataclass(frozen=True)
class RouterContext:
    """What some routers need besides ``x_TD``.

    ``step`` is the optimizer step (temperature schedules, phase switches); ``token_ids_T`` the
    input token ids (hash routing); ``batch_size``/``seq_len`` give the [B, S] layout of the
    flattened tokens (per-sequence mixing); ``doc_ids_T`` document ids for boundary-aware
    mixing; ``attn_probs_BSS`` the head-averaged attention probabilities of the preceding
    attention sublayer (attention-aware routing), present only when a router asks for them.
    ``sum_counts`` sums per-expert counts over the data-parallel ranks (the global-batch balance
    loss, ``moe.routers.losses.switch_balance_loss``); set by the MoE layer in training forwards
    when the parallel runtime installed it, None in one process (where it would be the identity).
    """

    step: int = 0
    token_ids_T: Tensor | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    doc_ids_T: Tensor | None = None
    attn_probs_BSS: Tensor | None = None
    training: bool = True
    sum_counts: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class RoutingDecision:
    """One layer's routing of T tokens.

    expert_ids_TK: int64 expert index per slot (any value where ``mask_TK`` is False).
    weights_TK:    fp32 combine weight per slot (0 where masked).
    probs_TE:      fp32 router distribution over experts, for statistics (entropy, balance).
    mask_TK:       bool, which slots are used; ``None`` means all T*K slots are used.
    aux_losses:    name -> scalar loss already multiplied by its coefficient; the trainer adds
                   their sum to the LM loss and logs each one.
    extras:        name -> float, router-specific values to log (temperature, threshold, ...).
    counts_E:      int64 used slots per expert, where the router counted them (its balance loss);
                   dropless dispatch takes them instead of counting again. A decision whose
                   ``expert_ids_TK`` or ``mask_TK`` is changed must drop or recount them.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    probs_TE: Tensor
    mask_TK: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)
    counts_E: Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.expert_ids_TK.shape[1]

    def valid_mask(self) -> Tensor:
        """``mask_TK`` with ``None`` expanded to all-True."""
        if self.mask_TK is None:
            return torch.ones_like(self.expert_ids_TK, dtype=torch.bool)
        return self.mask_TK


class Router(nn.Module):
    """Base class of every router.

    Subclasses set ``Config`` (a ``RouterConfig`` subclass), implement ``forward`` and may
    override ``after_step`` (called by the trainer once per optimizer step, without gradient,
    for updates such as DeepSeek-V3's bias) and ``needs_attention`` (ask the attention sublayer
    for its probabilities).
    """

    Config: type[RouterConfig] = RouterConfig
    needs_attention: bool = False
    per_token: bool = True
    """Each token's decision depends on that token alone (at evaluation), so a KV-cached decode may
    route new tokens by themselves; False for routers that mix across tokens."""

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int) -> None:
        """Keep ``cfg`` and check it against ``num_experts`` (``RouterConfig.check_num_experts``)."""
        super().__init__()
        cfg.check_num_experts(num_experts)
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts

    def forward(self, x_TD: Tensor, context: RouterContext) -> RoutingDecision:  # pragma: no cover
        raise NotImplementedError

    def step_sums(self) -> list[Tensor]:
        """Tensors the trainer sums across data-parallel ranks (in place) before ``after_step``.

        A router whose per-step update depends on statistics of the whole global batch (the
        DeepSeek-V3 bias update counts expert loads) returns its accumulators here, so every rank
        applies the same update. Most routers return nothing.
        """
        return []

    @property
    def wants_token_counts(self) -> int:
        """How many training tokens the router wants counted before training (0: none).

        The trainer then calls ``fit_token_counts`` once with the id counts of that many tokens
        of the training split (hash routing's frequency-balanced table). Most routers want none.
        """
        return 0

    def fit_token_counts(self, counts_V: Tensor) -> None:
        """Take training-data token counts (int64 [V]) before step 0; see ``wants_token_counts``."""

    @torch.no_grad()
    def after_step(self, step: int, experts: nn.Module) -> None:
        """Per-optimizer-step update outside autograd; most routers do nothing.

        ``experts`` (the layer's ``moe.experts.Experts``) is passed only for phase events that
        rebuild expert weights (EvoMoE's spawn); routers never touch experts otherwise.
        """
