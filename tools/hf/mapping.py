"""Tensor names and layouts between ``moe.model.MoETransformer`` and transformers' decoders.

Shape legend: V vocabulary, D model dim, H query heads, G key/value heads, d head dim, F ffn width, E experts.

moeforge (``model.state_dict()``)            transformers (``model.layers.{i}.`` omitted below)
  embed.weight [V, D]                          model.embed_tokens.weight
  head.weight [V, D] (absent when tied)        lm_head.weight
  norm.weight, blocks.i.attn_norm.weight       model.norm.weight, input_layernorm.weight
  blocks.i.ffn_norm.weight                     post_attention_layernorm.weight
  blocks.i.attn.qkv.weight [(H+2G)d, D]        self_attn.{q,k,v}_proj.weight: rows [0, Hd), [Hd, (H+G)d), [(H+G)d, (H+2G)d)
  blocks.i.attn.out.weight [D, Hd]             self_attn.o_proj.weight
  blocks.i.attn.{q,k}_norm.weight              self_attn.{q,k}_norm.weight
  blocks.i.ffn.router.gate.weight [E, D]       <moe>.gate.weight
  blocks.i.ffn.experts.w_gate_EDF [E, D, F]    <moe>.experts.{e}.<gate>.weight [F, D] (transposed per expert)
  blocks.i.ffn.experts.w_up_EDF [E, D, F]      <moe>.experts.{e}.<up>.weight [F, D]
  blocks.i.ffn.experts.w_down_EFD [E, F, D]    <moe>.experts.{e}.<down>.weight [D, F]
  blocks.i.ffn.shared.w_{gate,up}_DF, w_down_FD  mlp.shared_expert.{gate,up,down}_proj.weight (transposed)
  blocks.i.ffn.shared.w_sigmoid_D1 [D, 1]      mlp.shared_expert_gate.weight [1, D]
  blocks.i.ffn.w_{gate,up}_DF, w_down_FD       mlp.{gate,up,down}_proj.weight (dense layers, transposed)

Export writes the per-expert layout of the published checkpoints (``<moe>.experts.{e}.w1.weight``),
which every transformers version and other loaders read; import also accepts transformers 5's
fused layout (``<moe>.experts.gate_up_proj`` [E, 2F, D], gate rows first; ``.down_proj`` [E, D, F]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moe.model import ModelConfig
from tools.hf.arch import Arch, ConversionError

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some older checkpoints saved; recomputed, never loaded."""


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    """Whether block ``i`` is an MoE layer (``moe.model``: ``(i + 1) % moe_every == 0``)."""
    return (i + 1) % cfg.moe_every == 0


def _qkv_rows(cfg: ModelConfig) -> tuple[int, int]:
    d = cfg.d_model // cfg.num_heads
    return cfg.num_heads * d, cfg.kv_heads * d


# ------------------------------------------------------------------------------------------ export


def to_hf(sd: dict[str, Tensor], cfg: ModelConfig, arch: Arch) -> dict[str, Tensor]:
    """The transformers state dict (per-expert layout) of a moeforge ``model.state_dict()``."""
    out: dict[str, Tensor] = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    q_rows, kv_rows = _qkv_rows(cfg)
    g, u, dn = arch.expert_names
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "ffn_norm.weight"]
        q, k, v = sd[b + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": sd[b + "attn.out.weight"]})
        if cfg.qk_norm != "none":
            out[h + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"]
        if not is_moe_layer(cfg, i):
            out.update(_dense_to_hf(sd, b + "ffn.", h + "mlp."))
            continue
        m = f"{h}{arch.moe_prefix}."
        out[m + "gate.weight"] = sd[b + "ffn.router.gate.weight"]
        w_gate, w_up, w_down = (sd[f"{b}ffn.experts.{n}"] for n in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"))
        for e in range(cfg.num_experts):
            out[f"{m}experts.{e}.{g}.weight"] = w_gate[e].t()
            out[f"{m}experts.{e}.{u}.weight"] = w_up[e].t()
            out[f"{m}experts.{e}.{dn}.weight"] = w_down[e].t()
        if cfg.num_shared_experts:
            out.update(_dense_to_hf(sd, b + "ffn.shared.", h + "mlp.shared_expert."))
            out[h + "mlp.shared_expert_gate.weight"] = sd[b + "ffn.shared.w_sigmoid_D1"].t()
    return {name: t.detach().contiguous().clone() for name, t in out.items()}  # safetensors: no shared storage


def _dense_to_hf(sd: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    return {dst + "gate_proj.weight": sd[src + "w_gate_DF"].t(), dst + "up_proj.weight": sd[src + "w_up_DF"].t(),
            dst + "down_proj.weight": sd[src + "w_down_FD"].t()}


# ------------------------------------------------------------------------------------------ import


class HFTensors:
    """A transformers state dict being consumed: ``take`` each tensor once; ``finish`` refuses leftovers."""

    def __init__(self, tensors: dict[str, Tensor], arch: Arch) -> None:
        self.arch = arch
        self.left = dict(tensors)
        for name, t in sorted(tensors.items()):
            if name.endswith(".bias"):
                if bool((t != 0).any()):
                    raise ConversionError(f"{name} is a non-zero bias; moeforge's linear layers have no biases, so "
                                          f"this {arch.hf_class} cannot be imported exactly")
                del self.left[name]
            elif name.endswith(IGNORED_SUFFIXES):
                del self.left[name]

    def has(self, name: str) -> bool:
        return name in self.left

    def take(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The tensor ``name`` (now consumed), checked to have ``shape``."""
        if name not in self.left:
            raise ConversionError(f"{self.arch.hf_class} checkpoint has no tensor {name!r} (or it was read twice)")
        t = self.left.pop(name)
        if tuple(t.shape) != shape:
            raise ConversionError(f"{name} has shape {tuple(t.shape)}, the config implies {shape}")
        return t.float()

    def finish(self) -> None:
        if self.left:
            names = sorted(self.left)
            raise ConversionError(f"{len(names)} tensor(s) of the {self.arch.hf_class} checkpoint have no place in the moeforge "
                                  f"model, e.g. {names[:3]}; refusing to drop them")


def from_hf(tensors: dict[str, Tensor], cfg: ModelConfig, arch: Arch) -> dict[str, Tensor]:
    """A moeforge ``model.state_dict()`` (fp32) from a transformers MoE state dict of ``arch``."""
    t = HFTensors(tensors, arch)
    sd = backbone_from_hf(t, cfg)
    D, F, E = cfg.d_model, cfg.d_ff, cfg.num_experts
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        if not is_moe_layer(cfg, i):
            sd.update(dense_from_hf(t, h + "mlp.", b + "ffn.", D, cfg.dense_d_ff))
            continue
        prefixes = [f"{h}{arch.moe_prefix}.", f"{h}mlp."]  # transformers 5 renames Mixtral's block_sparse_moe to mlp
        m = next((p for p in prefixes if t.has(p + "gate.weight")), prefixes[0])
        sd[b + "ffn.router.gate.weight"] = t.take(m + "gate.weight", (E, D))
        if t.has(m + "experts.gate_up_proj"):  # transformers 5 fused layout
            gate_up = t.take(m + "experts.gate_up_proj", (E, 2 * F, D))
            sd[b + "ffn.experts.w_gate_EDF"] = gate_up[:, :F].transpose(1, 2).contiguous()
            sd[b + "ffn.experts.w_up_EDF"] = gate_up[:, F:].transpose(1, 2).contiguous()
            sd[b + "ffn.experts.w_down_EFD"] = t.take(m + "experts.down_proj", (E, D, F)).transpose(1, 2).contiguous()
        else:
            g, u, dn = arch.expert_names
            sd[b + "ffn.experts.w_gate_EDF"] = torch.stack([t.take(f"{m}experts.{e}.{g}.weight", (F, D)).t() for e in range(E)])
            sd[b + "ffn.experts.w_up_EDF"] = torch.stack([t.take(f"{m}experts.{e}.{u}.weight", (F, D)).t() for e in range(E)])
            sd[b + "ffn.experts.w_down_EFD"] = torch.stack([t.take(f"{m}experts.{e}.{dn}.weight", (D, F)).t() for e in range(E)])
        if cfg.num_shared_experts:
            sd.update(dense_from_hf(t, h + "mlp.shared_expert.", b + "ffn.shared.", D, cfg.num_shared_experts * F))
            sd[b + "ffn.shared.w_sigmoid_D1"] = t.take(h + "mlp.shared_expert_gate.weight", (1, D)).t().contiguous()
    t.finish()
    return sd


def backbone_from_hf(t: HFTensors, cfg: ModelConfig) -> dict[str, Tensor]:
    """Everything but the FFNs: embeddings, head, norms and attention (consumed from ``t``)."""
    V, D = cfg.vocab_size, cfg.d_model
    q_rows, kv_rows = _qkv_rows(cfg)
    d = D // cfg.num_heads
    sd: dict[str, Tensor] = {"embed.weight": t.take("model.embed_tokens.weight", (V, D)), "norm.weight": t.take("model.norm.weight", (D,))}
    if cfg.tie_embeddings:
        if t.has("lm_head.weight"):  # some tied checkpoints store the head too: it must be the embedding
            head = t.take("lm_head.weight", (V, D))
            if not torch.equal(head, sd["embed.weight"]):
                raise ConversionError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    else:
        sd["head.weight"] = t.take("lm_head.weight", (V, D))
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}.self_attn."
        sd[b + "attn_norm.weight"] = t.take(f"model.layers.{i}.input_layernorm.weight", (D,))
        sd[b + "ffn_norm.weight"] = t.take(f"model.layers.{i}.post_attention_layernorm.weight", (D,))
        sd[b + "attn.qkv.weight"] = torch.cat([t.take(h + "q_proj.weight", (q_rows, D)), t.take(h + "k_proj.weight", (kv_rows, D)),
                                               t.take(h + "v_proj.weight", (kv_rows, D))])
        sd[b + "attn.out.weight"] = t.take(h + "o_proj.weight", (D, q_rows))
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            sd[b + "attn.q_norm.weight"] = t.take(h + "q_norm.weight", (q_rows if full else d,))
            sd[b + "attn.k_norm.weight"] = t.take(h + "k_norm.weight", (kv_rows if full else d,))
    return sd


def dense_from_hf(t: HFTensors, src: str, dst: str, d_model: int, width: int) -> dict[str, Tensor]:
    """A SwiGLU ``{gate,up,down}_proj`` triple at ``src`` as moeforge's ``w_gate_DF``/``w_up_DF``/``w_down_FD`` at ``dst``."""
    return {dst + "w_gate_DF": t.take(src + "gate_proj.weight", (width, d_model)).t().contiguous(),
            dst + "w_up_DF": t.take(src + "up_proj.weight", (width, d_model)).t().contiguous(),
            dst + "w_down_FD": t.take(src + "down_proj.weight", (d_model, width)).t().contiguous()}


def describe(sd: dict[str, Any]) -> str:
    """Parameter count of a state dict, for log lines."""
    return f"{sum(t.numel() for t in sd.values()):,} parameters"
