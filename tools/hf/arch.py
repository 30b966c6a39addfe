"""Which Hugging Face decoder architectures moeforge converts to and from, and their config translation.

MoE targets (export and import): ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM``
and ``Qwen2MoeForCausalLM``; dense sources for sparse upcycling: ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``. They are all the same pre-norm
RMSNorm / RoPE (rotate-half) / SwiGLU decoder as ``moe.model.MoETransformer``; they differ in

- the router weights: Mixtral renormalises the top-k softmax for every k (``router.renormalize=always``),
  the Qwen MoEs and OLMoE follow ``norm_topk_prob`` (True: ``always``, False: ``never``);
- q/k RMSNorm: OLMoE over the whole projections (``model.qk_norm=full``), Qwen3 per head (``per_head``);
- dense layers between MoE layers: Qwen's ``decoder_sparse_step`` is ``model.moe_every``;
- Qwen2-MoE's one sigmoid-gated shared expert (``model.num_shared_experts`` x ``model.d_ff`` wide,
  ``model.shared_expert_gate=true``).

``hf_config`` (export) and ``moeforge_config`` (import) translate configs and raise
``ConversionError`` naming the setting one side cannot hold, so nothing converts approximately.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moe.errors import MoeforgeError
from moe.experts import ExpertsConfig
from moe.model import ModelConfig
from moe.routers import RouterConfig
from moe.routers.topk import TopKConfig


class ConversionError(MoeforgeError):
    """A checkpoint or config cannot be converted exactly; the message names the setting."""


@dataclass(frozen=True)
class Arch:
    """How one transformers architecture lays out a decoder (see the module docstring)."""

    name: str
    """moeforge's name for it (``--arch``)."""
    hf_class: str
    model_type: str
    moe: bool
    """A sparse MoE model (export/import target) rather than a dense one (upcycling source)."""
    moe_prefix: str = "mlp"
    """Submodule of a layer that holds the router (``.gate``) and ``.experts``."""
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Per-expert SwiGLU projection names: gate, up, down (Mixtral: w1, w3, w2)."""
    experts_key: str = "num_experts"
    expert_width_key: str = "moe_intermediate_size"
    qk_norm: str = "none"
    sparse_step: bool = False
    """Config has ``decoder_sparse_step``/``mlp_only_layers`` (dense layers between MoE layers)."""
    norm_topk_key: str | None = "norm_topk_prob"
    """Config key of the top-k renormalisation switch; None: always renormalised (Mixtral)."""
    shared_expert: bool = False


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(name="mixtral", hf_class="MixtralForCausalLM", model_type="mixtral", moe=True, moe_prefix="block_sparse_moe",
             expert_names=("w1", "w3", "w2"), experts_key="num_local_experts", expert_width_key="intermediate_size", norm_topk_key=None),
        Arch(name="qwen3_moe", hf_class="Qwen3MoeForCausalLM", model_type="qwen3_moe", moe=True, qk_norm="per_head", sparse_step=True),
        Arch(name="olmoe", hf_class="OlmoeForCausalLM", model_type="olmoe", moe=True, qk_norm="full", expert_width_key="intermediate_size"),
        Arch(name="qwen2_moe", hf_class="Qwen2MoeForCausalLM", model_type="qwen2_moe", moe=True, sparse_step=True, shared_expert=True),
        Arch(name="llama", hf_class="LlamaForCausalLM", model_type="llama", moe=False),
        Arch(name="mistral", hf_class="MistralForCausalLM", model_type="mistral", moe=False),
        Arch(name="qwen2", hf_class="Qwen2ForCausalLM", model_type="qwen2", moe=False),
        Arch(name="qwen3", hf_class="Qwen3ForCausalLM", model_type="qwen3", moe=False, qk_norm="per_head"),
    )
}
EXPORT_ARCHS = [a.name for a in ARCHS.values() if a.moe]
DENSE_ARCHS = [a.name for a in ARCHS.values() if not a.moe]


def arch_named(name: str, moe: bool) -> Arch:
    """The ``Arch`` called ``name`` (an MoE one when ``moe``, else a dense one), or a ConversionError listing them."""
    choices = EXPORT_ARCHS if moe else DENSE_ARCHS
    if name not in choices:
        raise ConversionError(f"architecture {name!r} is not supported here; choose one of {choices}")
    return ARCHS[name]


def arch_of_model_type(model_type: str, moe: bool) -> Arch:
    """The ``Arch`` whose transformers ``model_type`` is ``model_type`` (config.json's ``model_type``)."""
    for a in ARCHS.values():
        if a.model_type == model_type and a.moe == moe:
            return a
    kind = "MoE" if moe else "dense"
    known = [a.model_type for a in ARCHS.values() if a.moe == moe]
    raise ConversionError(f"config.json model_type {model_type!r} is not a supported {kind} architecture; supported: {known}")


def renormalizes(router: TopKConfig) -> bool:
    """Whether the router's top-k weights are renormalised to sum to 1 (``TopKConfig.renormalize``)."""
    return router.renormalize == "always" or (router.renormalize == "auto" and router.k > 1)


# ------------------------------------------------------------------------------------------ export


def hf_config(arch: Arch, model: ModelConfig, router: RouterConfig, experts: ExpertsConfig) -> dict[str, Any]:
    """Keyword arguments of the transformers config class of ``arch`` for this moeforge model.

    Raises ``ConversionError`` naming the moeforge setting the architecture cannot hold.
    """
    def refuse(key: str, value: object, why: str) -> ConversionError:
        return ConversionError(f"cannot export to {arch.hf_class}: {key}={value!r}: {why}")

    if not isinstance(router, TopKConfig):
        raise refuse("router.name", router.name, "its router is a softmax top-k over a linear gate (router=topk)")
    if router.local_search.enabled:
        raise refuse("router.local_search.enabled", True, "it has no permutation of the expert axis")
    if experts.capacity_factor is not None:
        raise refuse("experts.capacity_factor", experts.capacity_factor, "its MoE blocks are dropless (use null)")
    if model.qk_norm != arch.qk_norm:
        raise refuse("model.qk_norm", model.qk_norm, f"its attention has qk_norm={arch.qk_norm!r}")
    if arch.shared_expert:
        if model.num_shared_experts < 1 or not model.shared_expert_gate:
            raise refuse("model.num_shared_experts/shared_expert_gate", (model.num_shared_experts, model.shared_expert_gate),
                         "every MoE layer has one sigmoid-gated shared expert (num_shared_experts >= 1, shared_expert_gate=true)")
    elif model.num_shared_experts:
        raise refuse("model.num_shared_experts", model.num_shared_experts, "it has no shared experts")
    if not arch.sparse_step and model.moe_every != 1:
        raise refuse("model.moe_every", model.moe_every, "every layer is an MoE layer (moe_every=1)")
    if arch.norm_topk_key is None and not renormalizes(router):
        raise refuse("router.renormalize", router.renormalize,
                     f"with router.k={router.k} it renormalises the top-k weights to sum to 1 (router.renormalize=always)")
    head_dim = model.d_model // model.num_heads
    cfg: dict[str, Any] = {
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads, "num_key_value_heads": model.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta}, "attention_dropout": 0.0,
        "num_experts_per_tok": router.k, "router_aux_loss_coef": router.aux_loss_coef,
        arch.experts_key: model.num_experts, arch.expert_width_key: model.d_ff,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
    if arch.name == "mixtral":
        cfg.update(sliding_window=None, router_jitter_noise=router.jitter, head_dim=head_dim)
    else:
        cfg["attention_bias"] = False
        cfg[arch.norm_topk_key] = renormalizes(router)  # type: ignore[index]
    if arch.sparse_step:
        cfg.update(decoder_sparse_step=model.moe_every, mlp_only_layers=[], intermediate_size=model.dense_d_ff, use_sliding_window=False)
    if arch.name == "olmoe":
        cfg["clip_qkv"] = None
    if arch.shared_expert:
        cfg.update(shared_expert_intermediate_size=model.num_shared_experts * model.d_ff, qkv_bias=False)
    return cfg


# ------------------------------------------------------------------------------------------ import


def _get(config: Any, key: str, default: Any = None) -> Any:
    return getattr(config, key, default)


def check_common(config: Any, arch: Arch) -> None:
    """Refuse what a supported architecture's config may enable but moeforge cannot compute exactly."""
    def refuse(key: str, why: str) -> ConversionError:
        return ConversionError(f"cannot import this {arch.hf_class}: config {key}={_get(config, key)!r}: {why}")

    if _get(config, "hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "moeforge's FFNs are SwiGLU (silu)")
    heads = config.num_attention_heads
    head_dim = _get(config, "head_dim") or config.hidden_size // heads
    if head_dim * heads != config.hidden_size:
        raise refuse("head_dim", f"moeforge's head_dim is hidden_size / num_attention_heads = {config.hidden_size // heads}")
    rope = _get(config, "rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise refuse("rope_parameters", "only plain RoPE (rope_type 'default') is implemented; no scaling")
    if sliding_window(config) is not None:
        raise refuse("sliding_window", "moeforge attends to the whole causal prefix (no sliding window)")
    if _get(config, "clip_qkv") is not None:
        raise refuse("clip_qkv", "moeforge does not clamp q/k/v")
    if _get(config, "mlp_only_layers"):
        raise refuse("mlp_only_layers", "moeforge places dense layers by model.moe_every only")


def sliding_window(config: Any) -> int | None:
    """The attention window in use, or None when every layer attends to the whole prefix.

    Configs mark it differently: ``layer_types`` naming "sliding_attention" layers (Qwen2/3,
    Mistral in transformers 5), ``use_sliding_window`` false with a leftover ``sliding_window``
    (Qwen2-MoE sets it to 0 then), or a plain ``sliding_window`` (Mixtral, Mistral).
    """
    window = _get(config, "sliding_window")
    layer_types = _get(config, "layer_types")
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if _get(config, "use_sliding_window", True) is False or not window:
        return None
    return int(window)


def rope_theta(config: Any) -> float:
    """RoPE base of a transformers config (``rope_parameters`` in transformers 5, ``rope_theta`` before)."""
    rope = _get(config, "rope_parameters") or {}
    return float(rope.get("rope_theta", _get(config, "rope_theta", 10000.0)))


def moeforge_config(config: Any, arch: Arch) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``model.*`` overrides, ``router.*`` overrides) reproducing the transformers MoE ``config``.

    Only values that differ from nothing are left out: every model-shaping key is given, so the
    resulting ``python -m launch.train`` command does not depend on ``conf/model`` defaults.
    """
    check_common(config, arch)
    experts = int(_get(config, arch.experts_key))
    model: dict[str, Any] = {
        "vocab_size": config.vocab_size, "d_model": config.hidden_size, "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads, "num_kv_heads": _get(config, "num_key_value_heads") or config.num_attention_heads,
        "num_experts": experts, "d_ff": int(_get(config, arch.expert_width_key)),
        "moe_every": int(_get(config, "decoder_sparse_step", 1)) if arch.sparse_step else 1,
        "tie_embeddings": bool(_get(config, "tie_word_embeddings", False)), "max_seq_len": config.max_position_embeddings,
        "rope_theta": rope_theta(config), "norm_eps": float(config.rms_norm_eps), "qk_norm": arch.qk_norm,
        "num_shared_experts": 0, "shared_expert_gate": False,
    }
    if arch.sparse_step:
        model["dense_d_ff"] = int(config.intermediate_size)
    if arch.shared_expert:
        width = int(config.shared_expert_intermediate_size)
        if width % model["d_ff"]:
            raise ConversionError(f"cannot import this {arch.hf_class}: shared_expert_intermediate_size={width} is not a multiple of "
                                  f"moe_intermediate_size={model['d_ff']} (moeforge's shared experts are model.d_ff wide each)")
        model.update(num_shared_experts=width // model["d_ff"], shared_expert_gate=True)
    k = int(config.num_experts_per_tok)
    normalize = True if arch.norm_topk_key is None else bool(_get(config, arch.norm_topk_key))
    router: dict[str, Any] = {"k": k, "renormalize": "always" if normalize else "never",
                              "aux_loss_coef": float(_get(config, "router_aux_loss_coef", 0.01)),
                              "z_loss_coef": 0.0}  # none of these architectures has a router z-loss (moeforge's default: 0.001)
    if arch.name == "mixtral":
        router["jitter"] = float(_get(config, "router_jitter_noise", 0.0) or 0.0)
    ModelConfig(**model)  # a value moeforge refuses fails here, naming the model key
    TopKConfig(**router)
    return model, router


def dense_base_config(config: Any, arch: Arch) -> dict[str, Any]:
    """``model.*`` values a dense transformers ``config`` fixes (everything but the experts)."""
    check_common(config, arch)
    return {
        "vocab_size": config.vocab_size, "d_model": config.hidden_size, "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads, "num_kv_heads": _get(config, "num_key_value_heads") or config.num_attention_heads,
        "d_ff": int(config.intermediate_size), "dense_d_ff": int(config.intermediate_size),
        "tie_embeddings": bool(_get(config, "tie_word_embeddings", False)), "max_seq_len": config.max_position_embeddings,
        "rope_theta": rope_theta(config), "norm_eps": float(config.rms_norm_eps), "qk_norm": arch.qk_norm,
        "num_shared_experts": 0, "shared_expert_gate": False,
    }


def overrides(model: dict[str, Any], router: dict[str, Any]) -> list[str]:
    """Hydra command-line overrides for these ``model.*`` and ``router.*`` values (router=topk first)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        return repr(v) if isinstance(v, float) else str(v)

    names = [f.name for f in dataclasses.fields(ModelConfig)]
    out = ["router=topk"]
    out += [f"model.{k}={fmt(model[k])}" for k in names if k in model]
    out += [f"router.{k}={fmt(v)}" for k, v in router.items()]
    return out
