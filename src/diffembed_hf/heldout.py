"""Retrieval evaluation on held-out (anchor, positive, negatives...) rows: nDCG@10, MRR@10, recall@k.

The held-out rows become a small retrieval task: every row's query searches the pool of all held-out
positives and negatives, and its own positive is the one relevant document. The model is scored by
sentence-transformers' `InformationRetrievalEvaluator`; BM25 (the `bm25s` package) is scored by the same
evaluator's metric code on its own rankings, so the numbers compare like for like.
"""

from __future__ import annotations

import logging
import re

from datasets import Dataset
from sentence_transformers import SentenceTransformer

try:  # sentence-transformers >= 6 moved the evaluators; 5.x has them only here
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
except ImportError:
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

logger = logging.getLogger(__name__)

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10")


def retrieval_task(dataset: Dataset) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(queries, corpus, relevant_docs) from held-out rows; identical documents share one corpus id."""
    corpus_ids: dict[str, str] = {}
    queries, relevant = {}, {}
    document_columns = [c for c in dataset.column_names if c != "anchor"]
    for number, row in enumerate(dataset):
        for column in document_columns:
            corpus_ids.setdefault(row[column], f"d{len(corpus_ids)}")
        queries[f"q{number}"] = row["anchor"]
        relevant[f"q{number}"] = {corpus_ids[row["positive"]]}
    corpus = {doc_id: text for text, doc_id in corpus_ids.items()}
    return queries, corpus, relevant


def build_evaluator(dataset: Dataset, name: str = "held-out", batch_size: int = 32) -> InformationRetrievalEvaluator:
    return task_evaluator(*retrieval_task(dataset), name=name, batch_size=batch_size)


def task_evaluator(queries: dict[str, str], corpus: dict[str, str], relevant: dict[str, set[str]],
                   query_prompt: str = "", name: str = "held-out",
                   batch_size: int = 32) -> InformationRetrievalEvaluator:
    """The evaluator of a retrieval task given as ids -> texts. `query_prompt` goes before every query; the default
    empty prompt also stops sentence-transformers 6 from adding the model's stored query prompt on top (anchors of
    held-out rows already carry their instruction)."""
    return InformationRetrievalEvaluator(
        queries, corpus, relevant, name=name, batch_size=batch_size, write_csv=False, query_prompt=query_prompt,
        corpus_prompt="", ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[1, 5, 10],
        map_at_k=[10],
    )


def _pick(results: dict[str, float]) -> dict[str, float]:
    """The METRICS from an evaluator's result dict, whatever prefix (name, score function) it put on the keys."""
    picked = {}
    for metric in METRICS:
        kind, k = metric.split("@")
        key = next(key for key in results if re.search(rf"(^|_){kind}@{k}$", key))
        picked[metric] = float(results[key])
    return picked


def evaluate_model(model: SentenceTransformer, dataset: Dataset, batch_size: int = 32) -> dict[str, float]:
    """The model's retrieval metrics on held-out rows."""
    return _pick(build_evaluator(dataset, batch_size=batch_size)(model))


def strip_prompt(anchor: str) -> str:
    """The query without its instruction (prompts end in ':\\n'): BM25 gains nothing from instruction words."""
    return anchor.split(":\n", 1)[-1]


def evaluate_task(model: SentenceTransformer, queries: dict[str, str], corpus: dict[str, str],
                  relevant: dict[str, set[str]], query_prompt: str = "", batch_size: int = 32) -> dict[str, float]:
    """The model's retrieval metrics on a task given as ids -> texts (a BEIR folder's queries, corpus and qrels)."""
    return _pick(task_evaluator(queries, corpus, relevant, query_prompt, batch_size=batch_size)(model))


def evaluate_bm25(dataset: Dataset) -> dict[str, float]:
    """BM25's retrieval metrics on the same held-out task (queries without their instruction)."""
    queries, corpus, relevant = retrieval_task(dataset)
    return evaluate_bm25_task({key: strip_prompt(text) for key, text in queries.items()}, corpus, relevant)


def evaluate_bm25_task(queries: dict[str, str], corpus: dict[str, str],
                       relevant: dict[str, set[str]]) -> dict[str, float]:
    """BM25's (`bm25s`, its default tokenizer and parameters) retrieval metrics on a task given as ids -> texts,
    through the evaluator's metric code."""
    import bm25s

    evaluator = task_evaluator(queries, corpus, relevant)
    doc_ids, doc_texts = list(corpus), list(corpus.values())
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(doc_texts, show_progress=False), show_progress=False)
    k = min(100, len(doc_ids))
    hits, scores = retriever.retrieve(
        bm25s.tokenize(list(queries.values()), show_progress=False), k=k, show_progress=False
    )
    results = [
        [{"corpus_id": doc_ids[int(i)], "score": float(s)} for i, s in zip(row_hits, row_scores)]
        for row_hits, row_scores in zip(hits, scores)
    ]
    nested = evaluator.compute_metrics(results)  # {"ndcg@k": {10: value}, ...}
    return _pick({f"{name.split('@')[0]}@{k}": value for name, values in nested.items() for k, value in values.items()})
