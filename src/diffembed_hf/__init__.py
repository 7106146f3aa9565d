"""diffembed-hf: diffusion language models (Dream, LLaDA) as text-embedding models for Hugging Face.

Importing the package is light (no torch, no transformers), so that `diffembed --help` is instant. The DiffEmbed
classes load on first access (`diffembed_hf.DiffEmbedConfig`, ...) and that access registers them with
`AutoConfig` / `AutoModel` and marks them for `save_pretrained` to copy the remote-code files (`modeling/`) into
every checkpoint it writes; modules that load models call `register_auto_classes()` themselves.
"""

from __future__ import annotations

__version__ = "0.1.0"

_MODEL_CLASSES = {
    "DiffEmbedConfig": "configuration_diffembed",
    "DiffEmbedForEmbedding": "modeling_diffembed",
    "DiffEmbedModel": "modeling_diffembed",
    "DiffEmbedPreTrainedModel": "modeling_diffembed",
}
_registered = False


def register_auto_classes() -> None:
    """Register the DiffEmbed classes with transformers' Auto classes (once; idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel

    from .modeling.configuration_diffembed import DiffEmbedConfig
    from .modeling.modeling_diffembed import DiffEmbedForEmbedding

    AutoConfig.register(DiffEmbedConfig.model_type, DiffEmbedConfig, exist_ok=True)
    AutoModel.register(DiffEmbedConfig, DiffEmbedForEmbedding, exist_ok=True)
    DiffEmbedConfig.register_for_auto_class()
    DiffEmbedForEmbedding.register_for_auto_class("AutoModel")
    _registered = True


def __getattr__(name: str):
    if name in _MODEL_CLASSES:
        import importlib

        register_auto_classes()
        value = getattr(importlib.import_module(f".modeling.{_MODEL_CLASSES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "load_dream_tokenizer":  # the tokenizer builder pulls in tiktoken ranks
        from .tokenization import load_dream_tokenizer

        return load_dream_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DiffEmbedConfig",
    "DiffEmbedForEmbedding",
    "DiffEmbedModel",
    "DiffEmbedPreTrainedModel",
    "load_dream_tokenizer",
    "register_auto_classes",
]
