"""`diffembed evaluate` with compact vectors: the scores mteb reports equal an independent computation on the same
float embeddings (sign bits and their Hamming distance, the rescoring recipe, int8 buckets from
sentence-transformers' own quantize_embeddings), with bytes per vector beside each score, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytrec_eval
from sentence_transformers import quantize_embeddings
from test_compact import needs_scalar
from test_evaluation import Recorder, assert_same_metrics, beir, heldout_rows, models, ranking_metrics  # noqa: F401

from diffembed_hf.cli import main
from diffembed_hf.errors import UsageError
from diffembed_hf.evaluation import EvaluationError
from diffembed_hf.evaluation.run import evaluate


def floats_of(recorder, queries, corpus):
    return recorder.embeddings_for(list(queries.values())), recorder.embeddings_for(list(corpus.values()))


def cut(vectors, dim):
    vectors = vectors[:, :dim].astype(np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def trec_metrics(scores, qids, dids, qrels):
    """nDCG@10 and recall@10 by pytrec_eval (mteb's scorer, with its tie-breaking) from scores computed here."""
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(dids)} for i, q in enumerate(qids)}
    evaluator = pytrec_eval.RelevanceEvaluator({q: {d: 1 for d in qrels[q]} for q in qids},
                                               {"ndcg_cut.10", "recall.10"})
    values = evaluator.evaluate(run)
    return {"ndcg_at_10": float(np.mean([v["ndcg_cut_10"] for v in values.values()])),
            "recall_at_10": float(np.mean([v["recall_10"] for v in values.values()]))}


def test_binary_and_rescored_binary_scores_equal_an_independent_hamming_ranking(models, beir, tmp_path, monkeypatch):
    folder, (queries, corpus, relevant) = beir
    recorder = Recorder(monkeypatch)
    plain = evaluate(models[0], data=folder, output=tmp_path / "bits", truncate_dim=32, precision="binary")
    q_float, d_float = floats_of(recorder, queries, corpus)
    qids, dids = list(queries), list(corpus)
    q_bits, d_bits = cut(q_float, 32) > 0, cut(d_float, 32) > 0
    hamming = (q_bits[:, None, :] != d_bits[None, :, :]).sum(-1)
    task = next(iter(plain.summary))
    assert_same_metrics(plain.summary[task], trec_metrics(-hamming, qids, dids, relevant))
    assert plain.summary[task]["bytes_per_vector"] == 4
    assert plain.record["vectors"]["dim"] == 32 and plain.record["vectors"]["precision"] == "binary"

    rescored = evaluate(models[0], data=folder, output=tmp_path / "rescored", truncate_dim=32, precision="binary",
                        rescore=15)
    expected = np.full(hamming.shape, -1e9)
    for i in range(len(qids)):  # the recipe, written out: 15 best by Hamming, then float query . {0, 1} bits
        candidates = sorted(range(len(dids)), key=lambda j: (hamming[i, j], j))[:15]
        for j in candidates:
            expected[i, j] = 1e3 + float(cut(q_float, 32)[i] @ d_bits[j])
        for j in set(range(len(dids))) - set(candidates):
            expected[i, j] = -hamming[i, j]
    assert_same_metrics(rescored.summary[task], trec_metrics(expected, qids, dids, relevant))
    assert rescored.summary[task]["main_score"] != plain.summary[task]["main_score"]  # control: rescoring ranks anew
    assert "bytes/vector" in rescored.table and rescored.table.splitlines()[1].rstrip().endswith("4")


def test_truncated_float_scores_equal_exact_ranking_at_that_dimension(models, beir, tmp_path, monkeypatch):
    folder, (queries, corpus, relevant) = beir
    recorder = Recorder(monkeypatch)
    result = evaluate(models[0], data=folder, output=tmp_path / "cut", truncate_dim=16)
    q_float, d_float = floats_of(recorder, queries, corpus)
    task = next(iter(result.summary))
    assert_same_metrics(result.summary[task], ranking_metrics(cut(q_float, 16), cut(d_float, 16), list(queries),
                                                              list(corpus), relevant))
    assert result.summary[task]["bytes_per_vector"] == 64
    full = evaluate(models[0], data=folder, output=tmp_path / "full")  # control: all 64 dimensions score otherwise
    assert full.summary[task]["bytes_per_vector"] == 256
    assert full.summary[task]["main_score"] != result.summary[task]["main_score"]


@needs_scalar
def test_int8_scores_use_sentence_transformers_codes_with_corpus_ranges(models, beir, tmp_path, monkeypatch):
    folder, (queries, corpus, relevant) = beir
    recorder = Recorder(monkeypatch)
    result = evaluate(models[0], data=folder, output=tmp_path / "int8", precision="int8")
    q_float, d_float = floats_of(recorder, queries, corpus)
    ranges = np.stack([d_float.min(axis=0), d_float.max(axis=0)])  # every document: the corpus is under 10,000
    step = (ranges[1] - ranges[0]) / 255

    def centres(vectors):
        codes = quantize_embeddings(vectors, precision="int8", ranges=ranges)
        return ranges[0] + (codes.astype(np.float64) + 128.5) * step

    expected = ranking_metrics(centres(q_float), centres(d_float), list(queries), list(corpus), relevant)
    task = next(iter(result.summary))
    assert_same_metrics(result.summary[task], expected)
    assert result.summary[task]["bytes_per_vector"] == 64
    assert result.record["vectors"]["calibrations"][task]["calibration_rows"] == len(corpus)


def test_refusals_and_the_card(models, beir, tmp_path, capsys):
    folder, _ = beir
    with pytest.raises(EvaluationError, match="retrieval tasks.*STSBenchmark"):
        evaluate(models[0], tasks=["STSBenchmark"], output=tmp_path / "sts", precision="binary")
    with pytest.raises(UsageError, match="larger than the model's embedding dimension 64"):
        evaluate(models[0], data=folder, output=tmp_path / "wide", truncate_dim=128)
    with pytest.raises(UsageError, match="rescoring applies to binary"):
        evaluate(models[0], data=folder, output=tmp_path / "r", precision="float16", rescore=5)
    assert not any((tmp_path / name).exists() for name in ("sts", "wide", "r"))

    assert main(["evaluate", models[0], "--data", folder, "--output", str(tmp_path / "b"), "--precision", "ubinary",
                 "--truncate-dim", "24", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bytes/vector" in out and json.loads((tmp_path / "b" / "summary.json").read_text())["results"][0][
        "scores"]["bytes_per_vector"] == 3
    from diffembed_hf.evaluation.card import card_results

    with pytest.raises(EvaluationError, match="compact vectors"):
        # a card states the model's own scores, not those of its binary vectors
        card_results(tmp_path / "b", models[0], strict=True)
