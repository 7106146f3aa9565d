"""The in-process encoder: length-sorted batches under a token budget, run on the model's packed path.

It gives what `SentenceTransformer(folder, trust_remote_code=True).encode(texts, prompt=...)` gives for a
DiffEmbed folder (same tokenization, truncation, mean pooling in float32, normalisation), but never pads:
each batch is one `[1, total_tokens]` row with `cu_seq_lens_q`, the layout the model's varlen kernels take.
Batches are filled up to `max_tokens_per_batch` real tokens (longest texts first, so an out-of-memory error
shows up in the first batch, not after an hour), instead of a fixed text count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import sentence_transformers
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # 32 texts of 512 tokens: the GPU benchmark's batch, ~2 GiB of activations on 7B
_STRIPS_TEXT = int(sentence_transformers.__version__.split(".")[0]) < 6  # sentence-transformers 5 strips every text


class Encoder:
    """Embeds texts with a DiffEmbed sentence-transformers pipeline (Transformer -> mean Pooling -> [Normalize])."""

    def __init__(self, model: SentenceTransformer, *, prompt: str | None = None,
                 max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH):
        if max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be at least 1, got {max_tokens_per_batch}")
        self.model = model
        self.prompt = prompt or ""
        self.max_tokens_per_batch = max_tokens_per_batch
        self.transformer = model[0]
        self.auto_model = self.transformer.auto_model
        if getattr(self.auto_model.config, "model_type", None) != "diffembed":
            model_type = getattr(self.auto_model.config, "model_type", None)
            raise ValueError(f"not a DiffEmbed model (model_type={model_type!r})")
        names = [type(module).__name__ for module in model]
        if names[1:] not in (["Pooling"], ["Pooling", "Normalize"]) or not _is_mean_pooling(model[1]):
            raise ValueError(f"the corpus encoder runs Transformer -> mean Pooling -> [Normalize]; this model: {names}")
        self.normalize = names[-1] == "Normalize"
        self.include_prompt = getattr(model[1], "include_prompt", True)
        self.tokenizer = self.transformer.tokenizer
        self.max_length = model.max_seq_length or self.auto_model.config.max_position_embeddings
        self.dim = self.auto_model.config.hidden_size
        self.device = next(self.auto_model.parameters()).device
        self.prompt_length = self._prompt_length() if self.prompt and not self.include_prompt else 0

    def _prompt_length(self) -> int:
        """As sentence-transformers counts it: the prompt's tokens, less a trailing special token."""
        prompt = self.prompt.strip() if _STRIPS_TEXT else self.prompt
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_length)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of prompt + text, truncated to max_seq_length as sentence-transformers does; also how many
        were truncated (tokenized one token longer to find out, then those few again at the real limit)."""
        joined = [self.prompt + text for text in texts]
        if _STRIPS_TEXT:
            joined = [text.strip() for text in joined]
        ids = self.tokenizer(joined, truncation=True, max_length=self.max_length + 1)["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if long:
            again = self.tokenizer([joined[i] for i in long], truncation=True, max_length=self.max_length)["input_ids"]
            for i, row in zip(long, again):
                ids[i] = row
        return ids, len(long)

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of non-empty texts, longest first, cut into batches of at most `max_tokens_per_batch` tokens
        (a longer single text gets a batch of its own)."""
        order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])
        batches, current, tokens = [], [], 0
        for i in order:
            if current and tokens + lengths[i] > self.max_tokens_per_batch:
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += lengths[i]
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]], progress: tqdm | None = None) -> np.ndarray:
        """float32 `[len(ids), dim]`; a text with no token gets a zero vector, as in sentence-transformers."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        lengths = [len(row) for row in ids]
        started, tokens_done = time.perf_counter(), 0
        for batch in self.batches(lengths):
            out[batch] = self._forward([ids[i] for i in batch])
            if progress is not None:
                tokens_done += sum(lengths[i] for i in batch)
                progress.update(len(batch))
                rate = tokens_done / (time.perf_counter() - started)
                progress.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        if progress is not None:
            progress.update(lengths.count(0))
        return out

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        lengths = torch.tensor([len(row) for row in rows])
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        input_ids = torch.tensor([token for row in rows for token in row], device=self.device)[None]
        # cu_seq_lens_q stays on the host: the model reads it there (no device sync) and copies it over itself
        output = self.auto_model(input_ids=input_ids, cu_seq_lens_q=cu, max_length_q=int(lengths.max()))
        hidden = output.last_hidden_state[0]
        text_index = torch.repeat_interleave(torch.arange(len(rows)), lengths)
        weights = torch.ones(len(text_index))
        if self.prompt_length:  # leave the prompt's tokens out of the mean (Pooling include_prompt=False)
            position = torch.arange(len(text_index)) - cu[:-1].long().repeat_interleave(lengths)
            weights = (position >= self.prompt_length).float()
        sums = torch.zeros(len(rows), self.dim, dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, text_index.to(hidden.device), hidden.float() * weights.to(hidden.device)[:, None])
        counts = torch.zeros(len(rows)).index_add_(0, text_index, weights).clamp(min=1e-9)
        embeddings = sums / counts.to(hidden.device)[:, None]
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=1)
        return embeddings.cpu().numpy()

    def embed(self, texts: Sequence[str], progress: tqdm | None = None) -> tuple[np.ndarray, int]:
        """(embeddings, number of texts truncated)."""
        ids, truncated = self.tokenize(texts)
        return self.embed_ids(ids, progress), truncated


def _is_mean_pooling(pooling) -> bool:
    mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers 6: "mean" or a tuple of modes
    if mode is not None:
        return mode in ("mean", ("mean",), ["mean"])
    return bool(getattr(pooling, "pooling_mode_mean_tokens", False)) and pooling.get_pooling_mode_str() == "mean"


def warn_truncated(truncated: int, total: int, max_length: int) -> None:
    if truncated:
        logger.warning("%d of %d texts are longer than max_seq_length=%d tokens and were truncated. Raise "
                       "max_seq_length to embed them whole.", truncated, total, max_length)


def progress_bar(total: int, show: bool | None, description: str = "embedding") -> tqdm | None:
    if show is None:
        show = total >= 256
    return tqdm(total=total, desc=description, unit=" texts", smoothing=0.1) if show else None
