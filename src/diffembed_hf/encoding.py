"""Encoding texts with a DiffEmbed model through sentence-transformers, with the checks users expect.

`SentenceTransformer.encode` already sorts by length, batches, and releases each batch; on top of it this adds
what it lacks for long-document embedders: a clear error for a bad item, a warning when texts are truncated
(sentence-transformers cuts them silently), bf16 weights on CUDA by default, and a progress bar on long inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from . import register_auto_classes
from .errors import UsageError

logger = logging.getLogger(__name__)


class PromptNameError(UsageError, ValueError):
    """A prompt name the model does not store."""

register_auto_classes()

PROGRESS_BAR_MIN_TEXTS = 256  # below this a progress bar is noise


def load_encoder(
    model_name_or_path: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    max_seq_length: int | None = None,
    **kwargs,
) -> SentenceTransformer:
    """Load a DiffEmbed folder or Hub id as a `SentenceTransformer` (remote code trusted).

    Weights default to bfloat16 on CUDA (float16 overflows in Qwen-family models) and float32 elsewhere;
    the model pools and normalises in float32 whatever the weights' dtype.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model_kwargs = {"dtype": dtype, **kwargs.pop("model_kwargs", {})}
    model = SentenceTransformer(
        model_name_or_path, device=device, trust_remote_code=True, model_kwargs=model_kwargs, **kwargs
    )
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def max_positions(model: SentenceTransformer) -> int | None:
    """The longest input the model's positions allow (`max_position_embeddings`), if its config says."""
    config = getattr(model[0].auto_model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def save_embeddings(embeddings: np.ndarray, output: str | Path) -> Path:
    """Write `.npy` or `.safetensors` (key "embeddings") through a hidden temporary file renamed into place, so a
    reader never sees a half-written file; the file gets the user's umask like any other."""
    from .files import move_into_place, temporary_sibling

    output = Path(output)
    partial = temporary_sibling(output, "partial")
    try:
        if output.suffix == ".npy":
            with open(partial, "wb") as handle:
                np.save(handle, embeddings)
        else:
            from safetensors.numpy import save_file

            save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(partial))
        move_into_place(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return output


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Return `texts` as a list of strings, or raise a TypeError that names the first bad item's position."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is {type(text).__name__} ({text!r:.60}), expected str")
    return list(texts)


def count_truncated(model: SentenceTransformer, texts: list[str], prompt: str = "") -> tuple[int, int, int]:
    """How many texts (with their prompt) exceed `model.max_seq_length` tokens: (count, first index, longest)."""
    # verbose=False: no "indexing errors" warning for the texts that are about to be truncated on purpose
    encoded = model.tokenizer([prompt + text for text in texts], truncation=False, verbose=False)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > model.max_seq_length]
    return len(over), (over[0] if over else -1), max(lengths, default=0)


def encode(
    model: SentenceTransformer,
    texts: str | Sequence[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    batch_size: int = 32,
    convert_to_tensor: bool = False,
    show_progress_bar: bool | None = None,
) -> np.ndarray | torch.Tensor:
    """Embed `texts` (float32, L2-normalised by the model's Normalize module); one row per text.

    An empty list gives a `(0, dim)` result. Texts longer than `model.max_seq_length` tokens (prompt included)
    are truncated, with one warning per call that says how many.
    """
    single = isinstance(texts, str)
    texts = check_texts(texts)
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; 5.x has only the old name
    dim = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
    if not texts:
        empty = torch.zeros(0, dim)
        return empty if convert_to_tensor else empty.numpy()
    if prompt is None and prompt_name is not None:
        if prompt_name not in model.prompts:
            raise PromptNameError(f"prompt_name={prompt_name!r} is not one of the model's prompts {sorted(model.prompts)}")
        prompt = model.prompts[prompt_name]
    truncated, first, longest = count_truncated(model, texts, prompt or "")
    if truncated:
        logger.warning(
            "%d of %d texts are longer than max_seq_length=%d tokens and were truncated (first: texts[%d]; "
            "longest: %d tokens). Raise model.max_seq_length to embed them whole.",
            truncated, len(texts), model.max_seq_length, first, longest,
        )
    if show_progress_bar is None:
        show_progress_bar = len(texts) >= PROGRESS_BAR_MIN_TEXTS
    embeddings = model.encode(
        texts,
        prompt=prompt,
        batch_size=batch_size,
        convert_to_tensor=convert_to_tensor,
        convert_to_numpy=not convert_to_tensor,
        show_progress_bar=show_progress_bar,
    )
    if convert_to_tensor:
        embeddings = embeddings.float().cpu()
    return embeddings[0] if single else embeddings
