"""Evaluation of compact vectors: what a truncation or precision costs in each task's score.

mteb scores the float vectors an encoder returns; compact vectors need more than that, so `CompactEncoder` is the
DiffEmbed encoder plus mteb's search interface for retrieval tasks. It embeds exactly as the float evaluation does
(the same cached float vectors), truncates and renormalises them, and for retrieval hands the corpus to mteb's
`SearchEncoderWrapper` with `CompactIndex` as its index backend: the corpus is stored at the precision asked for
(int8/uint8 with ranges computed from a sample of that corpus, or given), each query is quantized the same way, and
`compact.compact_scores` ranks: cosine for float16 and dequantized int8/uint8, Hamming distance for binary, with the
optional float rescoring of each query's top candidates. mteb's own metrics (pytrec_eval) then score the ranking.
Other task types take truncation and float16 only (their inputs are not a corpus and its queries).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from mteb.models.search_wrappers import SearchEncoderWrapper

from ..compact import (DEFAULT_CALIBRATION_ROWS, SCALAR, Compaction, calibrate, calibration_sample, compact_scores,
                       quantize, top_k, truncate)
from .encoder import DiffEmbedEncoder

logger = logging.getLogger(__name__)

QUERY_BLOCK = 256  # queries scored at once: bounds the [queries, corpus] score matrix


class CompactIndex:
    """mteb `IndexEncoderSearchProtocol` backend holding the corpus at the compaction's precision."""

    def __init__(self, compaction: Compaction, model: dict, calibration_rows: int = DEFAULT_CALIBRATION_ROWS,
                 record: dict | None = None):
        self.compaction = compaction
        self.model = model
        self.calibration_rows = calibration_rows
        self.record = record if record is not None else {}  # what the last corpus was calibrated with
        self.clear()

    def add_documents(self, embeddings, idxs: list[str]) -> None:
        floats = np.asarray(embeddings, dtype=np.float32)
        active = self.compaction
        if active.precision in SCALAR and active.calibration is None:
            sample = floats[calibration_sample(len(floats), self.calibration_rows)]
            active = dataclasses.replace(active, calibration=calibrate(sample, self.model))
        if active.calibration is not None:
            self.record.update(calibration=active.calibration.digest(), calibration_rows=active.calibration.rows)
        self.active = active
        self.codes = quantize(floats, active.precision, active.calibration)
        self.ids = list(idxs)

    def search(self, embeddings, top_k_: int, similarity_fn=None, top_ranked: dict | None = None,
               query_idx_to_id: dict | None = None) -> tuple[list[list[float]], list[list[int]]]:
        """Each query's best `top_k_` documents: indices into the corpus, or with `top_ranked` (mteb's reranking
        mode, e.g. BRIGHT's excluded ids) into that query's candidate list."""
        queries = np.asarray(embeddings, dtype=np.float32)
        values: list[list[float]] = []
        indices: list[list[int]] = []
        if top_ranked is None:
            for start in range(0, len(queries), QUERY_BLOCK):
                block_values, block_indices = top_k(compact_scores(queries[start:start + QUERY_BLOCK], self.codes,
                                                                   self.active), top_k_)
                values += block_values
                indices += block_indices
            return values, indices
        position = {doc_id: i for i, doc_id in enumerate(self.ids)}
        for row, query in enumerate(queries):
            candidates = [position[doc_id] for doc_id in top_ranked.get(query_idx_to_id[row]) or []]
            if not candidates:
                values.append([])
                indices.append([])
                continue
            scores = compact_scores(query[None], self.codes[candidates], self.active)
            row_values, row_indices = top_k(scores, top_k_)
            values.append(row_values[0])
            indices.append(row_indices[0])
        return values, indices

    def clear(self) -> None:
        self.active = self.compaction
        self.codes = None
        self.ids: list[str] = []


class CompactEncoder(DiffEmbedEncoder):
    """`DiffEmbedEncoder` whose vectors are truncated (renormalised) and, for retrieval tasks, searched at the
    compaction's precision (mteb's `SearchProtocol`: `index` then `search`)."""

    def __init__(self, *args, compaction: Compaction, model_identity: dict,
                 calibration_rows: int = DEFAULT_CALIBRATION_ROWS, **kwargs):
        super().__init__(*args, **kwargs)
        self.compaction = compaction
        self.model_identity = model_identity
        self.calibration_rows = calibration_rows
        self.calibrations: dict[str, dict] = {}  # task -> the ranges its corpus gave (int8/uint8)
        self._search: SearchEncoderWrapper | None = None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        vectors = truncate(super().encode(inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                                          prompt_type=prompt_type, **kwargs), self.compaction.truncate_dim)
        if self.compaction.precision == "float16":  # float16 values, scored by mteb as they are
            vectors = vectors.astype(np.float16).astype(np.float32)
        return vectors

    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str, encode_kwargs: dict,
              num_proc: int | None = None, **kwargs: Any) -> None:
        record = self.calibrations.setdefault(task_metadata.name, {})
        backend = CompactIndex(self.compaction, self.model_identity, self.calibration_rows, record)
        self._search = SearchEncoderWrapper(self, index_backend=backend)
        self._search.index(corpus, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                           encode_kwargs=encode_kwargs, num_proc=num_proc, **kwargs)

    def search(self, queries, **kwargs: Any):
        return self._search.search(queries, **kwargs)
