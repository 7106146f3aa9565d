"""Tiny DiffEmbed configs, models with random weights everywhere, and model folders built once per session."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def tiny_config(**overrides) -> DiffEmbedConfig:
    kwargs = dict(TINY, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    kwargs.update(overrides)
    return DiffEmbedConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm weights and biases too) so that no parameter can hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def tiny_model(seed: int = 0, **overrides) -> DiffEmbedForEmbedding:
    return randomize(DiffEmbedForEmbedding(tiny_config(**overrides)), seed).eval()


# --------------------------------------------------------------------------------------------------------------
# Tiny model folders (what `save_sentence_transformer` writes), one build per distinct spec in a test session
# --------------------------------------------------------------------------------------------------------------

DREAM_IDS = dict(vocab_size=151667, pad_token_id=151643)  # a config that matches the real Dream tokenizer
DREAM_SPECIAL_IDS = dict(DREAM_IDS, bos_token_id=151665, eos_token_id=151643)  # ... and its special tokens too
FOLDER_DEFAULTS = dict(seed=0, weights="random", tokenizer="dream", max_seq_length=64, include_prompt=True)  # as below


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under the name the installed transformers gives it:
    5.x renamed `gradient_checkpointing_enable` and warns on the old name, which the oldest 5.x alone has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def word_tokenizer():
    """A 128-word vocabulary ("<pad>", "<s>", "w2" ... "w127"), split on whitespace: a model folder of a few KB."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<s>")


def load_tokenizer(name: str):
    """"dream" (the real Dream / Qwen2.5 tokenizer) or "words" (`word_tokenizer`)."""
    if name == "dream":
        from diffembed_hf import load_dream_tokenizer

        return load_dream_tokenizer()
    if name == "words":
        return word_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: 'dream' or 'words'")


def save_tiny_folder(path: Path, *, seed: int = 0, weights: str = "random", tokenizer="dream",
                     max_seq_length: int = 64, include_prompt: bool = True, **config) -> Path:
    """A tiny DiffEmbed folder at `path` (config: `tiny_config(**config)`).

    weights="random": every parameter drawn by `randomize(seed)` (norms too, so that none can hide a bug);
    "init": the model's own initialisation after `torch.manual_seed(seed)` (small weights, as a base model has).
    `tokenizer` is a name for `load_tokenizer` or a tokenizer object."""
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    if weights == "random":
        model = randomize(DiffEmbedForEmbedding(tiny_config(**config)), seed)
    elif weights == "init":
        torch.manual_seed(seed)
        model = DiffEmbedForEmbedding(tiny_config(**config))
    else:
        raise ValueError(f"weights={weights!r}: 'random' or 'init'")
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    return save_sentence_transformer(model.eval(), tokenizer, path, max_seq_length=max_seq_length,
                                     include_prompt=include_prompt)


class TinyFolders:
    """One tiny folder per distinct spec (the keyword arguments of `save_tiny_folder`), built on first use and
    shared by every test that asks for the same spec; read-only by contract: a test that changes a folder takes
    `copy(dest, ...)`. `check_unchanged` (run when the session ends) fails if a test changed a shared folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._tokenizers: dict[str, object] = {}
        self._built: dict[tuple, tuple[Path, dict]] = {}

    def __call__(self, *, name: str = "model", **spec) -> Path:
        """The shared folder of `spec` (its last path component is `name`)."""
        tokenizer = spec.get("tokenizer", "dream")
        spec = {**FOLDER_DEFAULTS, **(DREAM_IDS if tokenizer == "dream" else {}), **spec}
        key = (name, *sorted(spec.items()))
        if key not in self._built:
            if tokenizer not in self._tokenizers:  # loaded once: the Dream tokenizer takes a second or more
                self._tokenizers[tokenizer] = load_tokenizer(tokenizer)
            path = self.root / f"{len(self._built):02d}" / name
            save_tiny_folder(path, **{**spec, "tokenizer": self._tokenizers[tokenizer]})
            self._built[key] = path, _digest(path)
        return self._built[key][0]

    def copy(self, dest: Path, **spec) -> Path:
        """A private copy of the folder of `spec` at `dest`, free to be changed (byte-identical to a fresh build)."""
        return Path(shutil.copytree(self(**spec), dest))

    def check_unchanged(self) -> None:
        changed = [str(path) for path, digest in self._built.values() if _digest(path) != digest]
        assert not changed, f"a test changed shared tiny folders (take TinyFolders.copy instead): {changed}"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
