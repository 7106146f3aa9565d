"""The one encoding engine: length-sorted batches under a token budget, run on the model's packed path.

Every vector this package produces comes from `PackedEncoder`: `encoding.encode` (the Python API and `diffembed encode
-o x.npy`), corpus shards (`diffembed encode -o DIR/`, torchrun, Ray), in-memory corpora (`corpus.embed_texts`)
and evaluation. It gives what `SentenceTransformer(folder).encode(texts, prompt=...)` gives for a DiffEmbed
folder (same tokenization and truncation, mean pooling in float32, normalisation) but never pads: each batch is
one `[1, total_tokens]` row with `cu_seq_lens_q`, the layout the model's varlen kernels take. Batches are
filled up to `max_tokens_per_batch` real tokens, longest texts first (so an out-of-memory error shows up in the
first batch, not after an hour), optionally also capped at `max_texts_per_batch` texts.

Pooling is the model's own (`DiffEmbedForEmbedding` pools packed input per text in float32); only a model that
leaves the prompt out of the mean (`include_prompt=False`) or whose normalisation differs from its
sentence-transformers modules is pooled by sentence-transformers' own `Pooling` module instead. Results stay on
the device until the end of a call (or every `HOST_COPY_BYTES`), so a GPU is never stalled once per batch.

The checks the model leaves out of its forward (they would stall the device) are made here, on the host: each
batch's token ids before they are copied to the device, and every embedding on the host copy, once per copy.
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

from .errors import PromptNameError
from .modeling.modeling_diffembed import check_token_ids, non_finite_message
from .readers import surrogate_problem
from .validation import check_positive_int

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # 32 texts of 512 tokens: the GPU benchmark's batch, ~2 GiB of activations on 7B
PROGRESS_BAR_MIN_TEXTS = 256  # below this a progress bar is noise
HOST_COPY_BYTES = 256 * 2**20  # finished embeddings move to the host in pieces of about this size
_STRIPS_TEXT = int(sentence_transformers.__version__.split(".")[0]) < 6  # sentence-transformers 5 strips every text


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Return `texts` as a list of strings, or raise a TypeError (not a string) or ValueError (a lone surrogate,
    which the tokenizer cannot take) that names the first bad item's position."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is {type(text).__name__} ({text!r:.60}), expected str")
        problem = surrogate_problem(text, f"texts[{position}]")
        if problem:
            raise ValueError(problem)
    return list(texts)


def unknown_prompt(prompt_name: str, prompts: dict) -> PromptNameError:
    return PromptNameError(f"--prompt-name {prompt_name!r} is not one of the model's prompts: "
                           f"{', '.join(sorted(prompts)) or '(none)'}")


def resolve_prompt(model: SentenceTransformer, prompt: str | None, prompt_name: str | None) -> str | None:
    """The text put before each input: `prompt` as given, or the model's stored prompt named `prompt_name`."""
    if prompt is not None and prompt_name is not None:
        raise PromptNameError("pass prompt or prompt_name, not both")
    if prompt_name is not None:
        if prompt_name not in model.prompts:
            raise unknown_prompt(prompt_name, model.prompts)
        return model.prompts[prompt_name]
    return prompt


class PackedEncoder:
    """Embeds texts with a DiffEmbed sentence-transformers pipeline (Transformer -> mean Pooling -> [Normalize])."""

    def __init__(self, model: SentenceTransformer, *, prompt: str | None = None,
                 max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH, max_texts_per_batch: int | None = None):
        check_positive_int("max_tokens_per_batch", max_tokens_per_batch, optional=True)
        check_positive_int("max_texts_per_batch", max_texts_per_batch, optional=True)
        self.model = model
        self.prompt = prompt or ""
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_texts_per_batch = max_texts_per_batch
        self.transformer = model[0]
        self.auto_model = self.transformer.auto_model
        config = self.auto_model.config
        if getattr(config, "model_type", None) != "diffembed":
            raise ValueError(f"not a DiffEmbed model (model_type={getattr(config, 'model_type', None)!r})")
        names = [type(module).__name__ for module in model]
        if names[1:] not in (["Pooling"], ["Pooling", "Normalize"]) or not _is_mean_pooling(model[1]):
            raise ValueError(f"the encoder runs Transformer -> mean Pooling -> [Normalize]; this model: {names}")
        self.pooling = model[1]
        self.normalize = names[-1] == "Normalize"
        self.include_prompt = getattr(model[1], "include_prompt", True)
        self.tokenizer = self.transformer.tokenizer
        self.vocab_size = config.vocab_size
        self.max_length = model.max_seq_length or config.max_position_embeddings
        self.dim = config.hidden_size
        self.device = next(self.auto_model.parameters()).device
        self.prompt_length = self._prompt_length() if self.prompt and not self.include_prompt else 0
        # the model's own pooling serves unless the prompt leaves the mean or the model normalises on its own
        # where the sentence-transformers pipeline does not
        self.model_pools = not self.prompt_length and (self.normalize or not config.normalize_embeddings)

    def _prompt_length(self) -> int:
        """As sentence-transformers counts it: the prompt's tokens, less a trailing special token."""
        prompt = self.prompt.strip() if _STRIPS_TEXT else self.prompt
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_length)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of prompt + text, truncated to max_seq_length as sentence-transformers does; also how many
        were truncated (tokenized one token longer to find out, then those few again at the real limit)."""
        if not texts:
            return [], 0
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
        (a longer single text gets a batch of its own) and `max_texts_per_batch` texts."""
        order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])
        batches, current, tokens = [], [], 0
        for i in order:
            full = self.max_texts_per_batch is not None and len(current) >= self.max_texts_per_batch
            if current and (full or tokens + lengths[i] > self.max_tokens_per_batch):
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
        pending: list[tuple[list[int], torch.Tensor]] = []  # results not yet on the host
        pending_bytes = 0
        for batch in self.batches(lengths):
            embeddings = self._forward([ids[i] for i in batch])
            pending.append((batch, embeddings))
            pending_bytes += embeddings.numel() * 4
            if pending_bytes >= HOST_COPY_BYTES:
                self._to_host(pending, out)
                pending, pending_bytes = [], 0
            if progress is not None:
                tokens_done += sum(lengths[i] for i in batch)
                progress.update(len(batch))
                rate = tokens_done / (time.perf_counter() - started)
                progress.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        self._to_host(pending, out)
        if progress is not None:
            progress.update(lengths.count(0))
        return out

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """float32 embeddings of one packed batch, on the model's device."""
        lengths = [len(row) for row in rows]
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        input_ids = torch.tensor([token for row in rows for token in row])[None]
        check_token_ids(input_ids, self.vocab_size)  # on the host, before the copy: the model no longer reads them back
        input_ids = input_ids.to(self.device)
        # cu_seq_lens_q stays on the host: the model reads it there (no device sync) and copies it over itself
        output = self.auto_model(input_ids=input_ids, cu_seq_lens_q=cu, max_length_q=max(lengths))
        if self.model_pools:
            embeddings = output.embeddings
        else:
            embeddings = self._st_pooling(output.last_hidden_state[0], lengths)
        return F.normalize(embeddings, p=2, dim=1) if self.normalize else embeddings

    def _st_pooling(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """sentence-transformers' own Pooling module over the batch re-padded (float32 token states)."""
        width = max(lengths)
        padded = hidden.new_zeros(len(lengths), width, hidden.shape[-1], dtype=torch.float32)
        mask = torch.zeros(len(lengths), width, dtype=torch.long, device=hidden.device)
        start = 0
        for row, length in enumerate(lengths):
            padded[row, :length] = hidden[start:start + length].float()
            mask[row, :length] = 1
            start += length
        features = {"token_embeddings": padded, "attention_mask": mask}
        if self.prompt_length:
            features["prompt_length"] = self.prompt_length
        return self.pooling(features)["sentence_embedding"].float()

    def embed(self, texts: Sequence[str], progress: tqdm | None = None) -> tuple[np.ndarray, int]:
        """(embeddings, number of texts truncated)."""
        ids, truncated = self.tokenize(texts)
        return self.embed_ids(ids, progress), truncated

    def _to_host(self, pending: list[tuple[list[int], torch.Tensor]], out: np.ndarray) -> None:
        """One device-to-host copy for every batch finished since the last one, checked there: a non-finite
        vector (float16 overflow) is an error naming the texts, not a row of NaN in the output."""
        if not pending:
            return
        host = torch.cat([embeddings for _, embeddings in pending]).cpu().numpy()
        rows = [i for batch, _ in pending for i in batch]
        bad = ~np.isfinite(host).all(axis=1)
        if bad.any():
            raise FloatingPointError(non_finite_message(sorted(np.asarray(rows)[bad].tolist()), self.auto_model.dtype))
        out[rows] = host


def _is_mean_pooling(pooling) -> bool:
    mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers 6: "mean" or a tuple of modes
    if mode is not None:
        return mode in ("mean", ("mean",), ["mean"])
    return bool(getattr(pooling, "pooling_mode_mean_tokens", False)) and pooling.get_pooling_mode_str() == "mean"


def warn_truncated(truncated: int, total: int, max_length: int) -> None:
    """The one truncation warning, once per job: sentence-transformers truncates silently."""
    if truncated:
        logger.warning("%d of %d texts are longer than max_seq_length=%d tokens and were truncated. Raise "
                       "max_seq_length (--max-seq-length) to embed them whole.", truncated, total, max_length)


def progress_bar(total: int, show: bool | None, description: str = "embedding") -> tqdm | None:
    if show is None:
        show = total >= PROGRESS_BAR_MIN_TEXTS
    return tqdm(total=total, desc=description, unit=" texts", smoothing=0.1) if show else None
