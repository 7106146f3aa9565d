"""diffembed-hf: diffusion language models (Dream, LLaDA) as text-embedding models for Hugging Face.

Importing the package is light (no torch, no transformers), so that `diffembed --help` is instant. The entry
points users call (`load_encoder`, `encode`, `convert_checkpoint`, `TrainingConfig`, `encode_corpus`, `evaluate`,
`push`, `export_vllm`, `generate_reasonaug`, ...) load from their modules on first access, so
`from diffembed_hf import load_encoder` works without importing the rest. The DiffEmbed classes load the same way
(`diffembed_hf.DiffEmbedConfig`, ...), and that access registers them with `AutoConfig` / `AutoModel` and marks
them for `save_pretrained` to copy the remote-code files (`modeling/`) into every checkpoint it writes; modules
that load models call `register_auto_classes()` themselves.

The training function is `diffembed_hf.train.train`: `diffembed_hf.train` is the module that holds it, and a
package attribute cannot be both (importing the module binds its name on the package).
"""

from __future__ import annotations

__version__ = "0.1.0"

_MODEL_CLASSES = {
    "DiffEmbedConfig": "configuration_diffembed",
    "DiffEmbedForEmbedding": "modeling_diffembed",
    "DiffEmbedModel": "modeling_diffembed",
    "DiffEmbedPreTrainedModel": "modeling_diffembed",
}
# name -> the module (relative to this package) it is defined in
_ENTRY_POINTS = {
    "load_encoder": "encoding",
    "open_model_folder": "model_folder",  # a model folder read and checked once, for a job to hand down
    "ModelFolder": "model_folder",
    "encode": "encoding",
    "encode_file": "encoding",
    "EncodeOptions": "encoding",
    "save_sentence_transformer": "sentence_transformer",
    "convert_checkpoint": "convert",
    "ConvertOptions": "convert",
    "TrainingConfig": "train",
    "encode_corpus": "corpus",
    "CorpusOptions": "corpus",
    "embed_texts": "corpus",
    "evaluate": "evaluation",  # its mteb part is imported when it is called
    "EvaluateOptions": "evaluation",
    "push": "publish",
    "PushOptions": "publish",
    "export_vllm": "export",
    "generate_reasonaug": "reasonaug",
    "ReasonAugOptions": "reasonaug",
    "load_dream_tokenizer": "tokenization",  # the tokenizer builder pulls in tiktoken ranks
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
    if name in _ENTRY_POINTS:
        import importlib

        value = getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_MODEL_CLASSES, *_ENTRY_POINTS, "register_auto_classes"]
