"""The two toy tasks: clustered mixture of regressions, and the routing-fluctuation task.

Shape legend: T tokens, B batch (sequences), S sequence, D model dim, C clusters, X input dim.

Regression (research/routers.md §2, "Toy experiment"): ``x in R^8`` from 8 Gaussian clusters, each
cluster with its own affine map ``y = A_c (x - mu_c) / sigma + b_c``; the model is one MoE layer of
8 small SwiGLU experts, ``y_hat = MoELayer(x)``, trained on MSE. Routing is easy to read: the ideal
router sends each cluster to its own expert (NMI 1).

Fluctuation (the toy of the Graph-of-Tokens paper, arXiv 2505.00792, made hard): sequences of 32
tokens, all from one of 8 clusters, each token ``x_t = mu_c + noise * z_t`` with heavy noise. The
label of token t is ``sub_labels * c + bucket_c(z_t)``: the sequence's cluster and which of
``sub_labels`` equal-probability slabs along a cluster-specific direction ``w_c`` the token's own
noise falls in, so the right answer needs the cluster (evidence pooled along the sequence) *and* a
cluster-specific rule applied to the token: an expert per cluster. A token routed to another
cluster's expert gets another cluster's rule, so routing errors and flips cost accuracy (with
``sub_labels = 1``, the original task, the label is the cluster alone, which the attention
average and the classifier read without any help from the MoE layer: every router reached the
same ~95% there). ``drift``: the cluster means take one Gaussian random-walk step of per-coordinate
std ``drift`` at every training batch, so routing must keep up until the end; the probe keeps its
tokens (cluster and noise) and is re-expressed at the current means before each evaluation
(``refresh``), so flips measure routing instability on the same tokens. Model: linear embedding,
one pre-norm transformer block (causal attention, then the MoE layer), a linear classifier per
token, cross-entropy.

Both models give every router the same ``RouterContext`` fields: ``step``, ``batch_size``/``seq_len``
(per-sequence routers), ``token_ids_T`` (hash routing: a locality-sensitive hash of the raw input,
the sign pattern against 8 fixed random hyperplanes, since the toys have no vocabulary), and for
the fluctuation task the attention probabilities when the router asks (``needs_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from moe.experts import ExpertsConfig
from moe.layer import MoELayer
from moe.model import Block, ModelConfig, RMSNorm, rope_tables
from moe.routers import RouterConfig, RouterContext

NUM_CLUSTERS = 8
LSH_BITS = 8


@dataclass(frozen=True)
class Batch:
    x: Tensor
    """Inputs: ``x_TX`` (regression) or ``x_BSX`` (fluctuation)."""
    y: Tensor
    """Targets: ``y_TD`` (regression) or class ids ``y_BS`` (fluctuation)."""
    cluster: Tensor
    """True cluster of every token, flattened ``[T]``."""
    z: Tensor | None = None
    """Fluctuation task: each token's standard-normal noise ``z_BSX`` (``refresh`` re-expresses x from it)."""


def lsh_ids(x_TX: Tensor, planes_XL: Tensor) -> Tensor:
    """Token ids for hash routing: bit l is ``x . plane_l > 0`` (sign random projections)."""
    bits_TL = (x_TX @ planes_XL > 0).long()
    return (bits_TL << torch.arange(planes_XL.shape[1], device=x_TX.device)).sum(dim=-1)


class RegressionTask:
    """Clustered mixture of regressions in ``R^dim`` (module docstring); all draws from ``seed``."""

    loss_name = "mse"

    def __init__(self, seed: int, dim: int = 8, num_clusters: int = NUM_CLUSTERS, spread: float = 3.0, sigma: float = 0.7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim, self.num_clusters, self.sigma = dim, num_clusters, sigma
        self.mu_CX = torch.randn(num_clusters, dim, generator=g) * spread
        self.A_CXX = torch.randn(num_clusters, dim, dim, generator=g) * dim**-0.5
        self.b_CX = torch.randn(num_clusters, dim, generator=g)
        self.planes_XL = torch.randn(dim, LSH_BITS, generator=g)
        self.generator = g

    def sample(self, num_tokens: int, generator: torch.Generator | None = None) -> Batch:
        """``num_tokens`` points, clusters uniform; ``y = A_c (x - mu_c)/sigma + b_c`` exactly."""
        g = generator or self.generator
        c_T = torch.randint(self.num_clusters, (num_tokens,), generator=g)
        z_TX = torch.randn(num_tokens, self.dim, generator=g)
        x_TX = self.mu_CX[c_T] + self.sigma * z_TX
        y_TX = torch.einsum("tij,tj->ti", self.A_CXX[c_T], z_TX) + self.b_CX[c_T]
        return Batch(x=x_TX, y=y_TX, cluster=c_T)

    def refresh(self, batch: Batch) -> Batch:
        """The probe as is (the regression task does not drift)."""
        return batch

    def build_model(self, router_cfg: RouterConfig, num_experts: int, d_ff: int) -> "RegressionModel":
        return RegressionModel(self.dim, d_ff, num_experts, router_cfg, self.planes_XL)


class RegressionModel(nn.Module):
    """``y_hat = MoELayer(x)``; the batch is cut into pseudo-sequences of ``seq_len`` iid points."""

    seq_len = 32

    def __init__(self, dim: int, d_ff: int, num_experts: int, router_cfg: RouterConfig, planes_XL: Tensor) -> None:
        super().__init__()
        self.moe = MoELayer(dim, d_ff, num_experts, router_cfg, ExpertsConfig(backend="torch"))
        self.register_buffer("planes_XL", planes_XL.clone())

    def forward(self, batch: Batch, step: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(prediction, task loss, aux losses)."""
        x_TD = batch.x
        T = x_TD.shape[0]
        S = self.seq_len if T % self.seq_len == 0 else T
        context = RouterContext(step=step, token_ids_T=lsh_ids(x_TD, self.planes_XL), batch_size=T // S, seq_len=S, training=self.training)
        y_TD, aux = self.moe(x_TD, context)
        return y_TD, nn.functional.mse_loss(y_TD, batch.y), aux


class FluctuationTask:
    """Noisy-token sequence classification (module docstring); all draws from ``seed``."""

    loss_name = "cross-entropy"

    def __init__(
        self, seed: int, dim: int = 16, num_clusters: int = NUM_CLUSTERS, seq_len: int = 32, noise: float = 3.0,
        sub_labels: int = 1, drift: float = 0.0,
    ) -> None:
        if sub_labels < 1 or drift < 0 or noise <= 0:
            raise ValueError(f"fluctuation task: sub_labels ({sub_labels}) must be >= 1, drift ({drift}) >= 0, noise ({noise}) > 0")
        g = torch.Generator().manual_seed(seed)
        self.dim, self.num_clusters, self.seq_len, self.noise = dim, num_clusters, seq_len, noise
        self.sub_labels, self.drift = sub_labels, drift
        self.num_classes = num_clusters * sub_labels
        self.mu_CX = torch.randn(num_clusters, dim, generator=g)
        self.planes_XL = torch.randn(dim, LSH_BITS, generator=g)
        w_CX = torch.randn(num_clusters, dim, generator=g)
        self.w_CX = w_CX / w_CX.norm(dim=1, keepdim=True)
        # Slab edges of w_c . z ~ N(0, 1): the standard-normal quantiles i / sub_labels.
        q = torch.arange(1, sub_labels, dtype=torch.float64) / sub_labels
        self.edges = (torch.erfinv(2 * q - 1) * 2**0.5).float()
        self.generator = g

    def labels(self, c_B: Tensor, z_BSX: Tensor) -> Tensor:
        """``y_BS = sub_labels * c + bucket``, bucket = slab of ``w_c . z_t`` (equal-probability slabs)."""
        proj_BS = torch.einsum("bsx,bx->bs", z_BSX, self.w_CX[c_B])
        bucket_BS = torch.bucketize(proj_BS, self.edges)
        return c_B.unsqueeze(1) * self.sub_labels + bucket_BS

    def sample(self, num_tokens: int, generator: torch.Generator | None = None) -> Batch:
        """``num_tokens // seq_len`` sequences; each token ``mu_c + noise * z``, ``z ~ N(0, I)``.

        A training draw (no ``generator``) first moves the means by one drift step.
        """
        g = generator or self.generator
        if generator is None and self.drift > 0:
            self.mu_CX = self.mu_CX + self.drift * torch.randn(self.mu_CX.shape, generator=g)
        B, S = max(1, num_tokens // self.seq_len), self.seq_len
        c_B = torch.randint(self.num_clusters, (B,), generator=g)
        z_BSX = torch.randn(B, S, self.dim, generator=g)
        x_BSX = self.mu_CX[c_B].unsqueeze(1) + self.noise * z_BSX
        cluster_BS = c_B.unsqueeze(1).expand(B, S).contiguous()
        return Batch(x=x_BSX, y=self.labels(c_B, z_BSX), cluster=cluster_BS.reshape(-1), z=z_BSX)

    def refresh(self, batch: Batch) -> Batch:
        """The same tokens (cluster, noise, labels) at the current cluster means."""
        assert batch.z is not None
        c_B = batch.cluster.view(batch.z.shape[0], -1)[:, 0]
        return replace(batch, x=self.mu_CX[c_B].unsqueeze(1) + self.noise * batch.z)

    def build_model(self, router_cfg: RouterConfig, num_experts: int, d_ff: int) -> "FluctuationModel":
        return FluctuationModel(self.dim, self.num_classes, d_ff, num_experts, router_cfg, self.planes_XL)


class FluctuationModel(nn.Module):
    """Embedding -> one pre-norm block (causal attention + MoE, ``moe.model.Block``) -> classifier."""

    def __init__(
        self, in_dim: int, num_classes: int, d_ff: int, num_experts: int, router_cfg: RouterConfig, planes_XL: Tensor,
        d_model: int = 32, num_heads: int = 2,
    ) -> None:
        super().__init__()
        self.cfg = ModelConfig(d_model=d_model, num_heads=num_heads, num_layers=1, num_experts=num_experts, d_ff=d_ff)
        self.embed = nn.Linear(in_dim, d_model)
        self.moe = MoELayer(d_model, d_ff, num_experts, router_cfg, ExpertsConfig(backend="torch"))
        self.block = Block(self.cfg, self.moe)
        self.norm = RMSNorm(d_model, self.cfg.norm_eps)
        self.head = nn.Linear(d_model, num_classes)
        self.register_buffer("planes_XL", planes_XL.clone())

    def forward(self, batch: Batch, step: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(logits ``[B, S, C]``, task loss, aux losses). ``Block`` adds ``attn_probs_BSS`` when asked."""
        x_BSX = batch.x
        B, S, _ = x_BSX.shape
        ids_T = lsh_ids(x_BSX.reshape(B * S, -1), self.planes_XL)
        context = RouterContext(step=step, token_ids_T=ids_T, batch_size=B, seq_len=S, training=self.training)
        cos, sin = rope_tables(S, self.cfg.d_model // self.cfg.num_heads, self.cfg.rope_theta, x_BSX.device)
        h_BSD, y_BSD, aux = self.block(self.embed(x_BSX), None, cos, sin, context)
        _, normed_BSD = self.norm(h_BSD, residual=y_BSD)
        logits_BSC = self.head(normed_BSD)
        loss = nn.functional.cross_entropy(logits_BSC.reshape(B * S, -1), batch.y.reshape(-1))
        return logits_BSC, loss, aux


TASKS = {"regression": RegressionTask, "fluctuation": FluctuationTask}


def accuracy(output: Tensor, batch: Batch) -> float | None:
    """Token accuracy for the classification task; None for regression."""
    if batch.y.dtype != torch.long:
        return None
    return float((output.argmax(dim=-1) == batch.y).float().mean())


__all__ = ["Batch", "TASKS", "RegressionTask", "FluctuationTask", "accuracy", "lsh_ids"]
