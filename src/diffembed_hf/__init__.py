"""diffembed-hf: diffusion language models (Dream, LLaDA) as text-embedding models for Hugging Face.

Importing the package registers the DiffEmbed classes with `AutoConfig` / `AutoModel` and marks them for
`save_pretrained` to copy the remote-code files (`modeling/`) into every checkpoint it writes.
"""

from transformers import AutoConfig, AutoModel

from .modeling.configuration_diffembed import DiffEmbedConfig
from .modeling.modeling_diffembed import DiffEmbedForEmbedding, DiffEmbedModel, DiffEmbedPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(DiffEmbedConfig.model_type, DiffEmbedConfig, exist_ok=True)
AutoModel.register(DiffEmbedConfig, DiffEmbedForEmbedding, exist_ok=True)
DiffEmbedConfig.register_for_auto_class()
DiffEmbedForEmbedding.register_for_auto_class("AutoModel")


def __getattr__(name: str):
    # Lazy so that `import diffembed_hf` stays light; the tokenizer builder pulls in tiktoken ranks.
    if name == "load_dream_tokenizer":
        from .tokenization import load_dream_tokenizer

        return load_dream_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DiffEmbedConfig",
    "DiffEmbedForEmbedding",
    "DiffEmbedModel",
    "DiffEmbedPreTrainedModel",
    "load_dream_tokenizer",
]
