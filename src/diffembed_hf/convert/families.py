"""Source families: how each upstream layout (Dream, LLaDA, Qwen2, Llama, Mistral) maps onto DiffEmbed.

For every family: its config.json turned into `DiffEmbedConfig` kwargs (refusing what DiffEmbed cannot run
as the source does: sliding windows, scaled RoPE, quantization, mixture of experts) and the name each
DiffEmbed tensor has in the source checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from ..errors import ConversionError
from ..modeling.configuration_diffembed import DiffEmbedConfig
from ..modeling.modeling_diffembed import DiffEmbedForEmbedding

logger = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_diffembed.DiffEmbedConfig",
    "AutoModel": "modeling_diffembed.DiffEmbedForEmbedding",
}


@dataclass(frozen=True)
class Family:
    """How one upstream layout maps onto DiffEmbed.

    `config` turns the source config.json dict into DiffEmbedConfig kwargs; `source_name` gives, for each
    DiffEmbed tensor name, the name the source checkpoint stores it under; `dropped` matches source tensors
    an embedder does not need (language-model head, cached RoPE buffers).
    """

    name: str
    title: str
    diffusion: bool
    config: Callable[[dict, Path], dict]
    source_name: Callable[[str], str]
    dropped: re.Pattern


def _transformers_config(config_class, source: dict, path: Path):
    """Fill the source dict's defaults the way transformers itself would for that family."""
    kwargs = {k: v for k, v in source.items() if k not in ("model_type", "architectures", "auto_map")}
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{path}: not a valid {config_class.__name__} ({err})") from err


def _hf_backbone(tc, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> dict:
    """DiffEmbedConfig kwargs from a transformers Qwen2/Llama/Mistral config object (names are shared)."""
    return dict(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        head_dim=getattr(tc, "head_dim", None),
        hidden_act=tc.hidden_act,
        max_position_embeddings=tc.max_position_embeddings,
        rms_norm_eps=tc.rms_norm_eps,
        rope_parameters=dict(tc.rope_parameters or {}),
        attention_bias=qkv_bias,
        attention_output_bias=o_bias,
        mlp_bias=mlp_bias,
        initializer_range=tc.initializer_range,
    )


def _qwen2_config(source: dict, path: Path) -> dict:
    # Qwen2 (and Dream, which is Qwen2.5 run non-causally) always has q/k/v biases and no o_proj bias.
    kwargs = _hf_backbone(_transformers_config(Qwen2Config, source, path), qkv_bias=True, o_bias=False, mlp_bias=False)
    if "mask_token_id" in source:  # Dream's <|mask|>
        kwargs["mask_token_id"] = source["mask_token_id"]
    return kwargs


def _llama_config(source: dict, path: Path) -> dict:
    # Llama's attention_bias puts a bias on all four projections, o_proj included.
    tc = _transformers_config(LlamaConfig, source, path)
    return _hf_backbone(tc, qkv_bias=tc.attention_bias, o_bias=tc.attention_bias, mlp_bias=tc.mlp_bias)


def _mistral_config(source: dict, path: Path) -> dict:
    tc = _transformers_config(MistralConfig, source, path)
    return _hf_backbone(tc, qkv_bias=False, o_bias=False, mlp_bias=False)


# LLaDA keys and their upstream defaults (the OLMo-style ModelConfig of configuration_llada.py): a missing
# key means the upstream default, so a config that relies on an unsupported default is refused too.
_LLADA_REQUIREMENTS = (
    ("block_type", "sequential", lambda v: v == "llama", "a 'llama' block (separate q/k/v/up projections)"),
    ("layer_norm_type", "default", lambda v: v == "rms", "RMSNorm (layer_norm_type 'rms')"),
    ("layer_norm_with_affine", True, bool, "norm weights (layer_norm_with_affine true)"),
    ("bias_for_layer_norm", None, lambda v: not v, "norms without bias"),
    ("include_bias", False, lambda v: not v, "no bias on the output and MLP projections (include_bias false)"),
    ("rope", False, bool, "rotary positions (rope true)"),
    ("alibi", False, lambda v: not v, "no ALiBi"),
    ("attention_layer_norm", False, lambda v: not v, "no q/k norm (attention_layer_norm false)"),
    ("input_emb_norm", False, lambda v: not v, "no embedding norm (input_emb_norm false)"),
    ("block_group_size", 1, lambda v: v == 1, "ungrouped blocks (block_group_size 1)"),
    ("activation_type", "swiglu", lambda v: v in ("silu", "gelu", "relu"), "a gate activation silu, gelu or relu"),
)


def _llada_config(source: dict, path: Path) -> dict:
    experts = [key for key in source if "expert" in key and source[key]]
    if experts:
        raise ConversionError(f"{path}: mixture-of-experts LLaDA ({', '.join(experts)}) is not supported; "
                              "DiffEmbed runs a dense MLP.")
    for key, default, ok, meaning in _LLADA_REQUIREMENTS:
        value = source.get(key, default)
        if not ok(value):
            raise ConversionError(f"{path}: {key}={value!r} is not supported; DiffEmbed needs {meaning}.")
    heads = source.get("n_heads", 12)
    kv_heads = source.get("n_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if source.get("multi_query_attention") else heads
    d_model = _require(source, "d_model", path)
    return dict(
        vocab_size=source.get("embedding_size") or _require(source, "vocab_size", path),
        hidden_size=d_model,
        intermediate_size=source.get("mlp_hidden_size") or source.get("mlp_ratio", 4) * d_model,
        num_hidden_layers=_require(source, "n_layers", path),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act=source["activation_type"],
        max_position_embeddings=source.get("max_sequence_length", 1024),
        rms_norm_eps=source.get("rms_norm_eps", 1e-5),
        rope_theta=source.get("rope_theta", 10000.0),
        attention_bias=bool(source.get("include_qkv_bias")),
        attention_output_bias=False,
        mlp_bias=False,
        initializer_range=source.get("init_std", 0.02),
        # LLaDA rotates q/k in float32 whatever the model dtype (rope_full_precision, default true upstream).
        rope_fp32=bool(source.get("rope_full_precision", True)),
        mask_token_id=source.get("mask_token_id"),
    )


def _require(source: dict, key: str, path: Path):
    if source.get(key) is None:
        raise ConversionError(f"{path}: missing required key {key!r}")
    return source[key]


def _same_name(name: str) -> str:
    return name


# DiffEmbed name (under `model.layers.N.`) -> LLaDA name (under `model.transformer.blocks.N.`).
_LLADA_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.bias": "k_proj.bias",
    "self_attn.v_proj.bias": "v_proj.bias",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",  # ff_proj goes through the activation: it is the gate
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}
_LLADA_TOP_NAMES = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
}


def _llada_name(name: str) -> str:
    if name in _LLADA_TOP_NAMES:
        return _LLADA_TOP_NAMES[name]
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
    return f"model.transformer.blocks.{layer}.{_LLADA_LAYER_NAMES[rest]}"


_HF_DROPPED = re.compile(r"lm_head\.weight|.*\.rotary_emb\.inv_freq")
FAMILIES: dict[str, Family] = {
    "dream": Family("dream", "Dream (diffusion LM, Qwen2.5 layout)", True, _qwen2_config, _same_name, _HF_DROPPED),
    "llada": Family("llada", "LLaDA (diffusion LM, OLMo layout)", True, _llada_config, _llada_name,
                    re.compile(r"model\.transformer\.ff_out\.weight")),
    "qwen2": Family("qwen2", "Qwen2 / Qwen2.5 (autoregressive LLM)", False, _qwen2_config, _same_name, _HF_DROPPED),
    "llama": Family("llama", "Llama (autoregressive LLM)", False, _llama_config, _same_name, _HF_DROPPED),
    "mistral": Family("mistral", "Mistral (autoregressive LLM)", False, _mistral_config, _same_name, _HF_DROPPED),
}
_MODEL_TYPES = {
    "Dream": "dream", "dream": "dream", "llada": "llada", "qwen2": "qwen2", "llama": "llama", "mistral": "mistral",
}  # fmt: skip


def detect_family(source_config: dict, path: Path) -> Family:
    """The family named by config.json's `model_type`."""
    model_type = source_config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConversionError(
            f"{path}: model_type {model_type!r} is not a supported source "
            f"(supported: {', '.join(sorted(_MODEL_TYPES))}). If the checkpoint has one of these layouts "
            f"under another name, force it with family= (--family {{{','.join(FAMILIES)}}})."
        )
    return FAMILIES[_MODEL_TYPES[model_type]]


def sliding_window_cap(source: dict, family: Family, path: Path, ignore: bool) -> Optional[int]:
    """Refuse a source trained with a sliding window unless `ignore`; returns the window when ignored.

    DiffEmbed attends over the full text. Within `sliding_window` tokens the window changes nothing, so an
    ignored window caps the default max_seq_length at that size, where full attention equals the source's.
    """
    window = source.get("sliding_window")
    if family.name == "mistral":
        active = window is not None and window < source.get("max_position_embeddings", 131072)
    elif family.name in ("qwen2", "dream"):
        active = bool(source.get("use_sliding_window")) or "sliding_attention" in (source.get("layer_types") or ())
    else:
        active = False
    if not active:
        return None
    if not ignore:
        raise ConversionError(
            f"{path}: the source uses sliding-window attention (sliding_window={window}); DiffEmbed attends over "
            "the whole text, which differs from the source beyond the window. Pass ignore_sliding_window=True "
            "(--ignore-sliding-window) to convert anyway; the default max_seq_length is then capped at the window."
        )
    logger.warning("Ignoring the source's sliding window (%s): attention beyond it differs from the source.", window)
    return window


def build_config(source: dict, family: Family, path: Path, dtype: torch.dtype) -> DiffEmbedConfig:
    if source.get("quantization_config"):
        method = source["quantization_config"].get("quant_method", "?")
        raise ConversionError(
            f"{path}: quantized checkpoint (quant_method={method!r}); convert the unquantized weights."
        )
    kwargs = family.config(source, path)
    if kwargs.get("mask_token_id") is None:  # only diffusion LMs have one
        kwargs.pop("mask_token_id", None)
    # Passed explicitly, so DiffEmbedConfig's Dream defaults never stand in for a missing id.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kwargs[key] = source.get(key)
    try:
        config = DiffEmbedConfig(**kwargs, tie_word_embeddings=False)  # an embedder has no output head to tie
    except (NotImplementedError, ValueError) as err:
        raise ConversionError(f"{path}: {err}") from err
    config.architectures = [DiffEmbedForEmbedding.__name__]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    return config

