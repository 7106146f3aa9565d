"""DiffEmbed configuration: a Qwen2/Llama-shaped backbone run bidirectionally, plus embedding settings.

This file is Hub remote code: it is copied verbatim into every checkpoint and imports only `transformers`.
"""

from transformers import PretrainedConfig

_POOLING_MODES = ("mean",)
# Keys of a source model's config that mean nothing to an embedder and must not become attributes.
_SOURCE_ONLY_KEYS = ("model_type", "use_cache", "max_window_layers", "layer_types", "transformers_version")


class DiffEmbedConfig(PretrainedConfig):
    r"""
    Configuration of a DiffEmbed text-embedding model (DiffEmbed study, arXiv 2505.15045).

    The backbone fields use the names of transformers' `Qwen2Config`, so a plain Qwen2/Qwen2.5/Dream
    config dict can be passed as keyword arguments (`DiffEmbedConfig(**qwen2_config_dict)`).

    The shape fields (`vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads`, `head_dim`, `hidden_act`, `max_position_embeddings`,
    `rms_norm_eps`, `initializer_range`) mean what they mean in `Qwen2Config`; `pad_token_id`, `bos_token_id` and
    `eos_token_id` default to Dream's ids (all `<|endoftext|>`, 151643).

    Args:
        rope_theta (`float`): RoPE base. `rope_parameters` / `rope_scaling` dicts are accepted too; only
            the default (unscaled) RoPE is supported, anything else is refused rather than run wrong.
        attention_bias (`bool`, defaults to `True`): bias on the q/k/v projections (Qwen2 and Dream have one).
        attention_output_bias (`bool`, defaults to `False`): bias on the output projection.
        mlp_bias (`bool`, defaults to `False`): bias on the gate/up/down projections.
        pooling (`str`, defaults to `"mean"`): how token states become one vector. Mean over the real tokens,
            after the final RMSNorm, as in the study.
        normalize_embeddings (`bool`, defaults to `True`): L2-normalise the pooled vector (the model is
            trained and evaluated with cosine similarity).
        is_causal (`bool`, defaults to `False`): bidirectional attention. `True` only reproduces the causal ablation.
        rope_fp32 (`bool`, defaults to `False`): rotate q/k in float32 whatever the model dtype (LLaDA does this;
            Qwen2/Dream rotate in the model dtype).
    """

    model_type = "diffembed"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1_000_000.0,
        attention_bias: bool = True,
        attention_output_bias: bool = False,
        mlp_bias: bool = False,
        initializer_range: float = 0.02,
        pooling: str = "mean",
        normalize_embeddings: bool = True,
        is_causal: bool = False,
        rope_fp32: bool = False,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = 151643,
        bos_token_id: int | None = 151643,
        eos_token_id: int | None = 151643,
        **kwargs,
    ):
        rope_parameters, rope_scaling = kwargs.pop("rope_parameters", None), kwargs.pop("rope_scaling", None)
        rope = rope_parameters or rope_scaling
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise NotImplementedError(
                    f"DiffEmbedConfig supports only the default RoPE, got rope_type={rope_type!r}; "
                    "a scaled RoPE would silently change every position's rotation."
                )
            rope_theta = rope.get("rope_theta", rope_theta)
        if kwargs.pop("use_sliding_window", False):
            raise NotImplementedError(
                "DiffEmbedConfig runs full attention; the source config enables a sliding window "
                "(use_sliding_window=True), which bidirectional embedding does not reproduce."
            )
        kwargs.pop("sliding_window", None)
        for key in _SOURCE_ONLY_KEYS:
            kwargs.pop(key, None)
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling must be one of {_POOLING_MODES}, got {pooling!r}")
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if head_dim is None:
            head_dim = hidden_size // num_attention_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})"
            )

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_output_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.pooling = pooling
        self.normalize_embeddings = normalize_embeddings
        self.is_causal = is_causal
        self.rope_fp32 = rope_fp32
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["DiffEmbedConfig"]
