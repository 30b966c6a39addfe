"""Decoder-only MoE transformer: embedding, RMSNorm, RoPE, causal SDPA attention, MoE FFNs.

Shape letters: the ``moe`` package legend (B batch, S sequence, T = B*S tokens, D model dim, H query
heads, G key/value heads, d head dim, P cached positions, V vocabulary).

Pre-norm blocks ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; the FFN is an ``MoELayer`` in
every ``moe_every``-th layer (layer i is MoE when ``(i + 1) % moe_every == 0``) and a dense SwiGLU
otherwise. Each residual add is done by the norm that follows it (``RMSNorm(x, residual=...)``, one
kernel with the norm on a GPU), so a block hands its FFN output, unadded, to the next block's
attention norm or to the final norm. Under activation checkpointing the model adds it before each
block instead, so a checkpoint keeps one tensor per block. No parallelism lives here: ``parallel/``
rewires a built model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from kernels import ops
from moe.autocast import autocast_dtype, takes_gpu_path
from moe.errors import check
from moe.experts import EXPERT_WEIGHT_NAMES, ExpertsConfig, dense_swiglu
from moe.head_loss import head_cross_entropy
from moe.layer import MoELayer
from moe.recompute import MODES as RECOMPUTE_MODES
from moe.recompute import run_checkpointed
from moe.routers import RouterConfig, RouterContext
from moe.stats import RoutingStats, routing_flip_fraction

Reduce = Callable[[list[Tensor]], None]


QK_NORMS = ("none", "full", "per_head")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 256
    """Byte-level default; set to the tokenizer's size for memmap data."""
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (Ainslie et al. 2023); null = num_heads (plain
    multi-head attention). Each group of num_heads / num_kv_heads query heads shares one K/V head."""
    num_experts: int = 8
    d_ff: int = 256
    """Hidden width F of each routed expert."""
    dense_d_ff: int = 512
    """Hidden width of the dense SwiGLU in non-MoE layers."""
    moe_every: int = 1
    num_shared_experts: int = 0
    tie_embeddings: bool = False
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: str = "none"
    """RMSNorm on queries and keys before RoPE (eps ``norm_eps``): none | full (one norm over all
    query heads together and one over all key heads: OLMoE, Muennighoff et al. 2024) | per_head
    (one norm over head_dim shared by every head: Qwen3, Yang et al. 2025)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by a learned sigmoid gate (Qwen1.5/Qwen2-MoE);
    needs model.num_shared_experts >= 1."""

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_experts", "d_ff", "dense_d_ff", "moe_every", "max_seq_len"):
            value = getattr(self, key)
            check(value >= 1, f"model.{key}", value, "must be >= 1")
        check(self.num_shared_experts >= 0, "model.num_shared_experts", self.num_shared_experts, "must be >= 0")
        kv = self.kv_heads
        check(1 <= kv <= self.num_heads and self.num_heads % kv == 0, "model.num_kv_heads", self.num_kv_heads,
              f"must divide model.num_heads ({self.num_heads})")
        check(self.d_model % self.num_heads == 0, "model.d_model", self.d_model, f"must be divisible by model.num_heads ({self.num_heads})")
        check((self.d_model // self.num_heads) % 2 == 0, "model.d_model", self.d_model, "/ model.num_heads must be even (RoPE rotates pairs)")
        check(self.qk_norm in QK_NORMS, "model.qk_norm", self.qk_norm, f"must be one of {list(QK_NORMS)}")
        check(not self.shared_expert_gate or self.num_shared_experts >= 1, "model.shared_expert_gate", self.shared_expert_gate,
              "needs model.num_shared_experts >= 1 (there is no shared expert to gate)")

    @property
    def kv_heads(self) -> int:
        """Key/value heads in use (``num_kv_heads``, or ``num_heads`` when unset)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4) as an eager chain: ``x / sqrt(mean(x^2) + eps) * w`` computed in fp32,
    returned in the wider of the input's and the weight's dtypes."""
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * weight.float()
    return out.to(torch.promote_types(x.dtype, weight.dtype))


class _FusedRMSNorm(torch.autograd.Function):
    """``kernels.ops.rms_norm`` forward and ``rms_norm_backward`` backward: one kernel each way (and the
    small sum of the backward's ``dw`` partials)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        y, rstd = ops.rms_norm(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        dx, dw_parts = ops.rms_norm_backward(dy, x, weight, rstd)
        return dx, dw_parts.sum(0).to(weight.dtype), None, None


class _FusedAddRMSNorm(torch.autograd.Function):
    """``kernels.ops.add_rms_norm`` forward and ``add_rms_norm_backward`` backward: one kernel each way."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        h, y, rstd = ops.add_rms_norm(x, a, weight, eps, out_dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.a_dtype = a.dtype
        ctx.set_materialize_grads(False)
        return h, y

    @staticmethod
    def backward(ctx, dh: Tensor | None, dy: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        h, weight, rstd = ctx.saved_tensors
        if dy is None:  # y unused: h's gradient passes to x and a unchanged, as the add's backward would
            return dh, None if dh is None else dh.to(ctx.a_dtype), None, None, None
        dx, da, dw_parts = ops.add_rms_norm_backward(dh, dy, h, weight, rstd, ctx.a_dtype)
        return dx, dx if ctx.a_dtype == h.dtype else da, dw_parts.sum(0).to(weight.dtype), None, None


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """``rms_norm_reference`` written in ``out_dtype``, one kernel each way (``kernels.ops.rms_norm`` and
    its backward; the reference where Triton cannot run): what ``RMSNorm`` runs on a GPU."""
    return _FusedRMSNorm.apply(x, weight, eps, out_dtype)


def fused_add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(h, rms_norm_reference(h))`` for ``h = x + a``, the norm written in ``out_dtype``, one kernel each
    way (``kernels.ops.add_rms_norm`` and its backward): what ``RMSNorm(x, residual=a)`` runs on a GPU."""
    return _FusedAddRMSNorm.apply(x, a, weight, eps, out_dtype)


class RMSNorm(nn.Module):
    """RMSNorm (``rms_norm_reference``, computed in fp32), one kernel each way on a GPU.

    On CUDA (and ``meta``, which stands for it in the step budget) it runs ``kernels.ops.rms_norm``:
    the input (the fp32 residual stream, or a bf16 projection for the q/k norms, strided slices
    included) is read in its own dtype and the output is written directly in the dtype its consumer's
    GEMM runs in: CUDA autocast's (``moe.autocast.autocast_dtype``, bf16) while autocast is on, else the
    wider of the input's and the weight's dtypes. So no cast precedes or follows the norm, either way.
    Every consumer takes that bf16 output as it took the cast one: the attention's projection, the
    head, the expert GEMMs (already cast to bf16 by autocast or ``moe.experts.compute_dtype``) and the
    routers. Routers that compute in fp32 (their gate GEMM with fp32 output, jitter, the fp32 linear
    layers of comet, dselect_k, similarity, base_layers) thus see the bf16-rounded normed input on a
    GPU under autocast, as Megatron-style bf16 models do, where before they saw its fp32 value.

    On the CPU it is ``torch.nn.functional.rms_norm`` in fp32, returned in the wider of the input's and
    the weight's dtypes (fp32 for a bf16 activation under autocast, bf16 for a bf16 model): the default
    CPU run's numbers, unchanged.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _out_dtype(self, x: Tensor) -> torch.dtype:
        return autocast_dtype(x) or torch.promote_types(x.dtype, self.weight.dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The normed ``x``; with ``residual`` (a branch's output to add to the stream ``x``), the pair
        ``(h, norm(h))`` for ``h = x + residual``.

        The pair is one kernel each way on a GPU (``kernels.ops.add_rms_norm``): it reads ``x`` and
        ``residual`` once and writes ``h`` and the normed ``h``; its backward adds the gradient ``h``
        receives from the rest of the stream to the norm's own and writes the sum for ``x`` and (in the
        residual's dtype) for ``residual``, where eager autograd runs the add, the norm's backward, an add
        of the two gradients and a downcast. Elsewhere the two steps as written (bit-identical on the CPU).
        """
        if residual is None:
            return self._norm(x)
        if takes_gpu_path(x) and x.shape == residual.shape:
            return fused_add_rms_norm(x, residual, self.weight, self.eps, self._out_dtype(x))
        h = x + residual
        return h, self._norm(h)

    def _norm(self, x: Tensor) -> Tensor:
        if takes_gpu_path(x):
            return fused_rms_norm(x, self.weight, self.eps, self._out_dtype(x))
        out = nn.functional.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(torch.promote_types(x.dtype, self.weight.dtype))


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, head_dim/2] for rotary embeddings (Su et al. 2021, eq. 34)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope_reference(x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (first half, second half) pair of ``x`` by its position's angle (Su et al. 2021, eq. 34), in fp32."""
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BHSd.dtype)


class _FusedRope(torch.autograd.Function):
    """``kernels.ops.rope`` forward; its backward is the rotation by the negative angle (one kernel each way)."""

    @staticmethod
    def forward(ctx, x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return ops.rope(x_BHSd, cos, sin, False)

    @staticmethod
    def backward(ctx, dy_BHSd: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return ops.rope(dy_BHSd, cos, sin, True), None, None


def apply_rope(x_BHSd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``apply_rope_reference`` in one kernel each way on a GPU (``kernels.rope``; ``meta`` stands for
    a GPU in the step budget); elsewhere without the ``cat``: ``x * [cos, cos] + swap(x) * [-sin, sin]``
    over the two halves viewed as ``[..., 2, d/2]`` (one multiply, one flip, one fused multiply-add)."""
    if takes_gpu_path(x_BHSd) and x_BHSd.shape[-1] % 2 == 0:
        return _FusedRope.apply(x_BHSd, cos, sin)
    x = x_BHSd.float().unflatten(-1, (2, -1))
    cos2, sin2 = torch.stack([cos, cos], dim=-2), torch.stack([-sin, sin], dim=-2)
    return torch.addcmul(x * cos2, x.flip(-2), sin2).flatten(-2).to(x_BHSd.dtype)


class _FusedQKVHeads(torch.autograd.Function):
    """``kernels.ops.qkv_heads`` forward and ``qkv_heads_bwd`` backward: attention's fused projection to its
    q/k-normed, rotated [B, S, heads, d] heads (values: a view of the projection) and back, one kernel each
    way (the weight gradients are the sums of the backward's per-program partials)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, w_q: Tensor | None, w_k: Tensor | None, cos: Tensor, sin: Tensor, H: int, G: int, mode: str,  # type: ignore[override]
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        q_BSHd, k_BSGd, rstd_TR = ops.qkv_heads(qkv, w_q, w_k, cos, sin, H, G, mode, eps)
        ctx.save_for_backward(qkv if mode != "none" else None, rstd_TR, w_q, w_k, cos, sin)  # only the norms' backward reads qkv
        ctx.mode = mode
        B, S, N = qkv.shape
        d = N // (H + 2 * G)
        return q_BSHd, k_BSGd, qkv[..., (H + G) * d :].view(B, S, G, d)

    @staticmethod
    def backward(ctx, dq_BSHd: Tensor, dk_BSGd: Tensor, dv_BSGd: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        qkv, rstd_TR, w_q, w_k, cos, sin = ctx.saved_tensors
        dqkv, dwq_parts, dwk_parts = ops.qkv_heads_bwd(dq_BSHd, dk_BSGd, dv_BSGd, qkv, rstd_TR, w_q, w_k, cos, sin, ctx.mode)
        dw_q = None if w_q is None or not ctx.needs_input_grad[1] else dwq_parts.sum(0, dtype=w_q.dtype)
        dw_k = None if w_k is None or not ctx.needs_input_grad[2] else dwk_parts.sum(0, dtype=w_k.dtype)
        return dqkv, dw_q, dw_k, None, None, None, None, None, None


@dataclass
class LayerKVCache:
    """One attention layer's keys and values of the positions seen so far, [B, G, P, d] each (after
    RoPE and q/k norms), so a decoding step attends to them without recomputing them."""

    k_BGPd: Tensor | None = None
    v_BGPd: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BGPd is None else self.k_BGPd.shape[2]

    def extend(self, k_BGSd: Tensor, v_BGSd: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions; returns every position's keys and values."""
        if self.k_BGPd is None or self.v_BGPd is None:
            self.k_BGPd, self.v_BGPd = k_BGSd, v_BGSd
        else:
            self.k_BGPd = torch.cat([self.k_BGPd, k_BGSd], dim=2)
            self.v_BGPd = torch.cat([self.v_BGPd, v_BGSd], dim=2)
        return self.k_BGPd, self.v_BGPd


class KVCache:
    """Keys and values of every layer for incremental decoding (``MoETransformer.forward(..., cache=)``).

    The next call's tokens sit at positions ``length, length + 1, ...``: RoPE rotates them by those
    positions and they attend to every cached position and causally among themselves.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class Attention(nn.Module):
    """Causal multi-head attention with RoPE, grouped-query when ``num_kv_heads < num_heads``.

    One fused projection yields H query heads and G key and G value heads (G = ``num_kv_heads``);
    query head h reads K/V head ``h // (H / G)`` (GQA, Ainslie et al. 2023, sec. 2). With G = H the
    projection and result are exactly those of plain multi-head attention. ``qk_norm`` (see
    ``ModelConfig.qk_norm``) RMS-normalises queries and keys before RoPE: ``full`` over each whole
    projection (H*d and G*d wide), ``per_head`` over each head's d. With ``want_probs`` it
    computes attention explicitly and also returns the head-averaged
    probabilities [B, S, S] (for attention-aware routing), so no second attention is run.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, qk_norm: str = "none", norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.qk_norm = qk_norm
        if qk_norm != "none":
            full = qk_norm == "full"
            self.q_norm = RMSNorm(num_heads * self.head_dim if full else self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim if full else self.head_dim, norm_eps)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, want_probs: bool = False,
                cache: LayerKVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """``cos``/``sin`` hold the rows of these S positions; with ``cache`` the queries also attend to
        the cached earlier positions, and this call's keys and values are appended to it."""
        B, S, D = x_BSD.shape
        H, G = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x_BSD)
        if takes_gpu_path(x_BSD) and not want_probs:
            q, k, v = self._fused_heads(qkv, cos, sin)
        else:
            q, k, v = self._eager_heads(qkv, cos, sin)
        probs_BSS = None
        past = 0 if cache is None else cache.length
        if cache is not None:
            if want_probs:
                raise ValueError("a KV cache cannot serve a router that reads attention probabilities (attention_aware)")
            k, v = cache.extend(k, v)
        if past:  # new queries see every cached position and, among themselves, the earlier ones
            seen = torch.ones(S, past + S, dtype=torch.bool, device=x_BSD.device).tril(diagonal=past)
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if S == 1 else seen, enable_gqa=G != H)
        elif want_probs:
            if G != H:  # every query head reads its group's K/V head
                k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            causal = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
            attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            y = (attn.to(v.dtype) @ v)
            probs_BSS = attn.mean(dim=1)
        else:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H)
        return self.out(y.transpose(1, 2).reshape(B, S, D)), probs_BSS

    def _eager_heads(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, d], k and v [B, G, S, d] from the fused projection: split, q/k norms, RoPE, op by op."""
        B, S, _ = qkv.shape
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qk_norm == "full":  # normalise the whole query / key projections, then split heads
            q, k, v = qkv.split([H * d, G * d, G * d], dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        q, k, v = qkv.view(B, S, H + 2 * G, d).transpose(1, 2).split([H, G, G], dim=1)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _fused_heads(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``_eager_heads`` in one kernel each way (``kernels.qkv_heads``): q and k come out as [B, S, heads, d]
        memory (FlashAttention's own layout), v stays a view of the projection (as in ``_eager_heads``); all
        three are returned as their [B, heads, S, d] views."""
        normed = self.qk_norm != "none"
        w_q, w_k = (self.q_norm.weight, self.k_norm.weight) if normed else (None, None)
        eps = self.q_norm.eps if normed else 0.0
        heads = _FusedQKVHeads.apply(qkv, w_q, w_k, cos, sin, self.num_heads, self.num_kv_heads, self.qk_norm, eps)
        return tuple(t.transpose(1, 2) for t in heads)  # type: ignore[return-value]


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate_DF = nn.Parameter(torch.randn(d_model, d_ff) * d_model**-0.5)
        self.w_up_DF = nn.Parameter(torch.randn(d_model, d_ff) * d_model**-0.5)
        self.w_down_FD = nn.Parameter(torch.randn(d_ff, d_model) * d_ff**-0.5)

    def forward(self, x_TD: Tensor, context: RouterContext) -> tuple[Tensor, dict[str, Tensor]]:
        return dense_swiglu(x_TD, self.w_gate_DF, self.w_up_DF, self.w_down_FD), {}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.qk_norm, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x_BSD: Tensor, branch_BSD: Tensor | None, cos: Tensor, sin: Tensor, context: RouterContext,
                cache: LayerKVCache | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(x, y, aux)``: the residual stream after the attention and this block's FFN output ``y``, not
        yet added to it: the next norm adds it (``RMSNorm(x, residual=y)``, one kernel with the norm on
        a GPU). ``branch_BSD`` is the previous block's such output (None: nothing pending)."""
        B, S, D = x_BSD.shape
        want_probs = isinstance(self.ffn, MoELayer) and self.ffn.router.needs_attention
        if branch_BSD is None:
            normed_BSD = self.attn_norm(x_BSD)
        else:
            x_BSD, normed_BSD = self.attn_norm(x_BSD, residual=branch_BSD)
        a, probs = self.attn(normed_BSD, cos, sin, want_probs, cache)
        x_BSD, normed_BSD = self.ffn_norm(x_BSD, residual=a)
        if probs is not None:
            context = replace(context, attn_probs_BSS=probs)
        y_TD, aux = self.ffn(normed_BSD.reshape(B * S, D), context)
        return x_BSD, y_TD.view(B, S, D), aux


class MoETransformer(nn.Module):
    """The language model: ``forward(tokens_BS, step) -> (logits_BSV, aux_losses)``.

    ``aux_losses`` maps each auxiliary loss name to its sum over MoE layers (coefficients
    already applied); the trainer adds their total to the cross-entropy.
    """

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, experts_cfg: ExpertsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A tied embedding is also the output head: scale it like one so initial logits are O(1).
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5 if cfg.tie_embeddings else 1.0)
        blocks = []
        for i in range(cfg.num_layers):
            if (i + 1) % cfg.moe_every == 0:
                ffn: nn.Module = MoELayer(cfg.d_model, cfg.d_ff, cfg.num_experts, router_cfg, experts_cfg, cfg.num_shared_experts,
                                          cfg.shared_expert_gate)
            else:
                ffn = DenseFFN(cfg.d_model, cfg.dense_d_ff)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=cfg.d_model**-0.5)
        self.checkpointing = "none"
        self.fp32_residual = False
        """Keep the residual stream in fp32 under autocast (``set_fp32_residual``); by default it is in autocast's dtype."""

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        """(layer index, MoE layer) for every MoE block."""
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)]

    def expert_weights(self) -> list[nn.Parameter]:
        """Every MoE layer's stacked expert weights (``moe.experts.EXPERT_WEIGHT_NAMES``), in layer order: the
        parameters ``optim.master_weights`` holds in bf16, with their fp32 masters in the optimizer."""
        return [getattr(layer.experts, name) for _, layer in self.moe_layers() for name in EXPERT_WEIGHT_NAMES]

    def experts_per_token(self) -> dict[int, int]:
        """Layer index -> routed experts one token uses there, nominally (``k``; 1 for routers without one)."""
        return {i: layer.experts_per_token for i, layer in self.moe_layers()}

    def active_params(self) -> int:
        """Parameters one token's forward multiplies with (``N_active`` of PaLM's model FLOPs, Chowdhery
        et al. 2022, appendix B): every matrix, but of each MoE layer's routed experts only the share
        ``experts_per_token / num_experts``. Vectors (norms, biases) and an untied input embedding (a
        lookup) do no matrix product and are left out; a tied embedding counts once, as the head.
        Any device, ``meta`` included; count before any parallel rewiring (it sees local shards after).
        """
        share: dict[int, float] = {}
        for _, layer in self.moe_layers():
            for p in layer.experts.parameters():
                share[id(p)] = layer.experts_per_token / layer.num_experts
        active = 0
        for name, p in self.named_parameters():
            if p.ndim < 2 or (name == "embed.weight" and not self.cfg.tie_embeddings):
                continue
            active += round(p.numel() * share.get(id(p), 1.0))
        return active

    # What a trainer asks of the model. It never reaches into the layers: every per-layer detail
    # (statistics, probes, router hooks, backends) stays behind these methods.

    def prepare(self, device: torch.device) -> None:
        """Fix every MoE layer's concrete expert backend for ``device`` (``auto`` chooses once)."""
        for _, layer in self.moe_layers():
            layer.resolve_backend(device)

    def token_counts_wanted(self) -> int:
        """How many training tokens the routers want counted before step 0 (0: none; see hash routing)."""
        return max((layer.router.wants_token_counts for _, layer in self.moe_layers()), default=0)

    def fit_token_counts(self, counts_V: Tensor) -> None:
        """Hand every router the training split's token-id counts (int64 [V])."""
        for _, layer in self.moe_layers():
            layer.router.fit_token_counts(counts_V)

    def set_activation_checkpointing(self, mode: str) -> None:
        """Recompute each block's activations in the backward: ``none`` | ``full`` | ``selective`` (moe/recompute.py)."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r}: must be one of {list(RECOMPUTE_MODES)}")
        self.checkpointing = mode

    def set_fp32_residual(self, on: bool) -> None:
        """Where autocast runs the GEMMs in bf16 (a GPU), the residual stream between blocks is bf16 too by
        default: the embedding's output is cast once, and every add and norm of the stream then reads
        and writes 2 bytes per element instead of 4, as a model held in bf16 does (Megatron-LM's default;
        torchtitan's FSDP2 mixed precision). ``on`` keeps the stream in fp32 (Megatron-LM's
        ``--fp32-residual-connection``); the norms compute in fp32 either way. CPUs (no CUDA autocast) keep
        fp32."""
        self.fp32_residual = on

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> None:
        """``torch.compile`` every transformer block in place (one compiled graph per block, reused by
        all blocks of the same shape). Data-dependent parts of the MoE layer (expert counts) become
        graph breaks, so they run eagerly."""
        for block in self.blocks:
            block.compile(backend=backend, dynamic=False, mode=mode)

    def router_step_sums(self) -> list[Tensor]:
        """Tensors to sum across data-parallel ranks (in place) before ``after_step``."""
        return [t for _, layer in self.moe_layers() for t in layer.router.step_sums()]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Per-optimizer-step hook of every MoE layer (see ``MoELayer.after_step``)."""
        for _, layer in self.moe_layers():
            layer.after_step(step)

    def routing_sums(self) -> dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """Each MoE layer's raw routing sums and maxima since the last reset (fresh tensors)."""
        return {i: layer.stats.raw() for i, layer in self.moe_layers()}

    def load_routing_sums(self, sums: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]]) -> None:
        """Seed the routing accumulators (a resumed log window), layer index -> (sums, maxes)."""
        for i, layer in self.moe_layers():
            if i in sums:
                layer.stats.load_raw(*sums[i])

    def take_routing_metrics(self, reduce_sum: Reduce, reduce_max: Reduce) -> dict[str, float | list[int]]:
        """Routing statistics since the last call, as ``routing/layer{i}/{stat}``; then reset.

        ``reduce_sum`` / ``reduce_max`` reduce a list of tensors in place across data-parallel ranks
        (identity in one process) before the values are summarised (``RoutingStats.summarize``).
        """
        out: dict[str, float | list[int]] = {}
        for i, (sums, maxes) in self.routing_sums().items():
            reduce_sum(list(sums.values()))
            reduce_max(list(maxes.values()))
            for key, value in RoutingStats.summarize(sums, maxes).items():
                out[f"routing/layer{i}/{key}"] = value
        for _, layer in self.moe_layers():
            layer.stats.reset()
        return out

    @contextlib.contextmanager
    def probing_routing(self) -> Iterator[None]:
        """Evaluation forwards inside this block record each MoE layer's top-1 choices (the probe
        batch), keeping the previous probe for ``routing_flips``."""
        for _, layer in self.moe_layers():
            layer.record_probe = True
        try:
            yield
        finally:
            for _, layer in self.moe_layers():
                layer.record_probe = False

    def routing_flips(self) -> dict[int, float]:
        """Per MoE layer: fraction of probe tokens whose top-1 expert changed between the last two
        probes; layers probed only once are absent."""
        return {
            i: routing_flip_fraction(layer.previous_probe_top1_T, layer.probe_top1_T)
            for i, layer in self.moe_layers()
            if layer.previous_probe_top1_T is not None and layer.probe_top1_T is not None
        }

    def kv_cache_refusal(self) -> str | None:
        """Why a KV cache cannot reproduce this model's full forward (None: it can). Cached decoding
        routes the new tokens alone, so every router must decide per token, and experts must be
        dropless (a capacity depends on how many tokens one forward holds)."""
        for i, layer in self.moe_layers():
            if not layer.router.per_token:
                return f"layer {i}'s router ({type(layer.router).__name__}) mixes information across tokens"
            if layer.capacity_factor is not None:
                return f"layer {i} drops tokens beyond a capacity (experts.capacity_factor={layer.capacity_factor})"
        return None

    def new_kv_cache(self) -> KVCache:
        """An empty cache for ``forward(..., cache=)``; ``ValueError`` when the model cannot use one."""
        why = self.kv_cache_refusal()
        if why is not None:
            raise ValueError(f"no KV cache for this model: {why}")
        return KVCache(len(self.blocks))

    def forward(self, tokens_BS: Tensor, step: int = 0, doc_ids_BS: Tensor | None = None,
                cache: KVCache | None = None, targets_BS: Tensor | None = None, reduction: str = "mean") -> tuple[Tensor, dict[str, Tensor]]:
        """``(logits_BSV, aux_losses)``; with ``targets_BS``, ``(cross-entropy, aux_losses)`` instead: the
        fp32 loss (``reduction`` mean or sum over tokens) without materialising the logits (moe/head_loss.py).
        ``cache`` (from ``new_kv_cache``, inference only): ``tokens_BS`` continue the cached
        positions, and their keys and values are added to it."""
        B, S = tokens_BS.shape
        past = 0 if cache is None else cache.length
        if past + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + S} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        context = RouterContext(
            step=step,
            token_ids_T=tokens_BS.reshape(-1),
            batch_size=B,
            seq_len=S,
            doc_ids_T=None if doc_ids_BS is None else doc_ids_BS.reshape(-1),
            training=self.training,
        )
        cos, sin = rope_tables(past + S, self.cfg.d_model // self.cfg.num_heads, self.cfg.rope_theta, tokens_BS.device)
        cos, sin = cos[past:], sin[past:]
        x, branch = self.embed(tokens_BS), None
        residual = None if self.fp32_residual else autocast_dtype(x)
        if residual is not None:  # the residual stream in autocast's dtype (bf16), as the activations around it
            x = x.to(residual)
        aux_total: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x, branch, aux = block(x, branch, cos, sin, context, cache.layers[i])
            else:
                if branch is not None and self.checkpointing != "none":  # a checkpoint keeps one stream tensor per block, not two
                    x, branch = x + branch, None
                x, branch, aux = run_checkpointed(self.checkpointing, block, x, branch, cos, sin, context)
            for name, value in aux.items():
                aux_total[name] = aux_total[name] + value if name in aux_total else value
        x = self.norm(x) if branch is None else self.norm(x, residual=branch)[1]
        weight_VD = self.head.weight if self.head is not None else self.embed.weight
        if targets_BS is not None:
            return head_cross_entropy(x.flatten(0, 1), weight_VD, targets_BS.flatten(), reduction), aux_total
        return x @ weight_VD.t(), aux_total
