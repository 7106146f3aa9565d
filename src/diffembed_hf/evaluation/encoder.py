"""A DiffEmbed model as mteb sees it: an `AbsEncoder` that picks each task's instruction itself.

mteb's automatic SentenceTransformer wrapper never applies the task's default prompt, drops prompt keys for tasks
outside its registry and puts a bare task prompt on documents too (docs/design/evaluation.md); this wrapper routes the
study's instruction onto queries (and onto every input of symmetric tasks) and never onto documents, records
what each task used, and gives mteb a model identity unique to the weights so its result cache cannot hand one
model another's scores. All encoding goes through `_embed`, one function.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from mteb.abstasks.abstask import get_abstask_prompt
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from sentence_transformers import SentenceTransformer

from ..packed_encoder import DEFAULT_MAX_TOKENS_PER_BATCH
from ..model_folder import ModelIdentity
from ..corpus import embed_texts, visible_devices
from .suites import STUDY_INSTRUCTIONS, SYMMETRIC_TYPES, render_prompt

logger = logging.getLogger(__name__)

CACHE_BYTES = 8 * 2**30  # embeddings kept for reuse within a run (a BRIGHT corpus of 10^5 docs x 3584 is 1.4 GiB)


# Below this many texts, one process per GPU (each loading the model) costs more than it saves.
MULTI_DEVICE_MIN_TEXTS = 20_000


def _embed(model: SentenceTransformer, texts: list[str], prompt: str, max_tokens_per_batch: int, *,
           source: str | None = None) -> np.ndarray:
    """THE encoding seam of the evaluation: float32, L2-normalised rows for `prompt + text`.

    The project's corpus encoder (`corpus.embed_texts`): length-sorted batches under a token budget, the packed
    attention path, bf16 weights on CUDA, pooling in float32, a truncation warning and a progress bar. A large
    corpus on a machine with several GPUs is spread over all of them, one process each loading `source` (the
    model folder or Hub id; None when the user named a device, which is then the only one used).
    """
    devices = visible_devices()
    if source is not None and len(devices) > 1 and len(texts) >= MULTI_DEVICE_MIN_TEXTS:  # source: no --device given
        return embed_texts(source, texts, prompt=prompt, max_tokens_per_batch=max_tokens_per_batch,
                           max_seq_length=model.max_seq_length, devices=devices)
    return embed_texts(model, texts, prompt=prompt, max_tokens_per_batch=max_tokens_per_batch)


def _texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def mteb_identity(identity: ModelIdentity) -> tuple[str, str]:
    """(name, revision) for mteb: a Hub id and its commit, or 'diffembed-local/<folder>' and the folder's content
    digest (`checkpoint.model_identity`), so two different models (or one folder before and after retraining)
    never share mteb's cached results."""
    if identity.sha256 is not None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(identity.model).name) or "model"
        return f"diffembed-local/{name}", identity.key
    return identity.model, identity.revision or "unknown"


def model_meta(model: SentenceTransformer, name: str, revision: str, settings: dict[str, Any]) -> ModelMeta:
    """mteb's ModelMeta; `settings` that change scores (max length, instruction overrides) become its
    experiment_kwargs, so results with other settings sit in another cache folder."""
    dim = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
    return ModelMeta.create_empty(overwrites=dict(
        name=name, revision=revision, framework=["Sentence Transformers", "PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE,
        max_tokens=model.max_seq_length, embed_dim=dim, use_instructions=True, modalities=["text"],
        n_parameters=sum(p.numel() for p in model.parameters()), experiment_kwargs=settings or None,
    ))


def default_instruction(task_metadata) -> str:
    """mteb's own default for a task: its metadata prompt (the query side of a dict), else its task class's."""
    prompt = task_metadata.prompt
    if isinstance(prompt, dict):
        prompt = prompt.get(PromptType.query.value)
    return prompt or get_abstask_prompt(task_metadata.name)


class DiffEmbedEncoder(AbsEncoder):
    """mteb encoder over a DiffEmbed `SentenceTransformer`.

    `instructions`: task name -> instruction (a user's file), over the study's and mteb's defaults.
    `query_prompts`: task name -> the exact text put before each query (local tasks: the model's `query` prompt,
    `--query-prompt`, or '' when queries already carry their instruction); documents then carry nothing.
    `prompt_sources`: for those tasks, (instruction, where it came from), as the results record them.
    """

    def __init__(self, model: SentenceTransformer, meta: ModelMeta, *, instructions: dict[str, str] | None = None,
                 query_prompts: dict[str, str] | None = None, prompt_sources: dict[str, tuple[str, str]] | None = None,
                 max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH, source: str | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.model = model
        self.source = source
        self.mteb_model_meta = meta
        self.instructions = dict(instructions or {})
        self.query_prompts = dict(query_prompts or {})
        self.prompt_sources = dict(prompt_sources or {})
        self.max_tokens_per_batch = max_tokens_per_batch
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.used: dict[str, dict[str, str]] = {}  # task -> side -> prompt actually sent, this run

    def routing(self, task_metadata) -> dict[str, Any]:
        """What a task's inputs get: the instruction, where it came from, and the prompt on each side."""
        name = task_metadata.name
        if name in self.query_prompts:
            instruction, source = self.prompt_sources.get(name, (self.query_prompts[name], "local task: query prompt"))
            return {"instruction": instruction, "source": source, "symmetric": False,
                    "query": self.query_prompts[name], "document": ""}
        if name in self.instructions:
            instruction, source = self.instructions[name], "instruction file"
        elif name in STUDY_INSTRUCTIONS:
            instruction, source = STUDY_INSTRUCTIONS[name], "the study"
        else:
            instruction, source = default_instruction(task_metadata), "mteb default prompt (LLM2Vec's instruction)"
        prompt = render_prompt(instruction)
        symmetric = task_metadata.type in SYMMETRIC_TYPES
        return {"instruction": instruction, "source": source, "symmetric": symmetric, "query": prompt,
                "document": prompt if symmetric else ""}

    def prompt_for(self, task_metadata, prompt_type: PromptType | None) -> str:
        route = self.routing(task_metadata)
        if prompt_type == PromptType.document:
            return route["document"]
        return route["query"]  # queries; and inputs of symmetric tasks, which mteb sends without a side

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.prompt_for(task_metadata, prompt_type)
        side = prompt_type.value if prompt_type is not None else "input"
        self.used.setdefault(task_metadata.name, {})[side] = prompt
        key = (_texts_digest(texts), prompt)
        if key in self._cache:  # a corpus shared by several tasks or splits is embedded once per run
            self._cache.move_to_end(key)
            logger.info("%s: reusing the embeddings of %d texts", task_metadata.name, len(texts))
            return self._cache[key]
        embeddings = _embed(self.model, texts, prompt, self.max_tokens_per_batch, source=self.source)
        if not np.isfinite(embeddings).all():
            raise FloatingPointError(f"{task_metadata.name}: the model returned non-finite embeddings")
        self._cache[key] = embeddings
        while sum(e.nbytes for e in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return embeddings

