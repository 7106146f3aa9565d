"""Shared by the evaluation tests: local BEIR-layout sets and the results evaluate stores."""

from __future__ import annotations

import json
from pathlib import Path


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: dict, excluded: dict | None = None,
               titles: dict | None = None) -> str:
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id, text in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": (titles or {}).get(doc_id, ""), "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            record = {"_id": qid, "text": text}
            if excluded and qid in excluded:
                record["excluded_ids"] = sorted(excluded[qid])
            f.write(json.dumps(record) + "\n")
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, docs in qrels.items() for d in sorted(docs))
    return str(folder)


def stored_results(output: str | Path) -> list[dict]:
    """summary.json's results (format version 2)."""
    summary = json.loads((Path(output) / "summary.json").read_text())
    assert summary["version"] == 2
    return summary["results"]


def stored_scores(output: str | Path, task: str) -> dict:
    """The scores of the one result of `task` in summary.json."""
    [scores] = [r["scores"] for r in stored_results(output) if r["task"] == task]
    return scores


def card_with_results(folder: str | Path, repo_id: str, results: str | Path | None = None):
    """The card `push` generates for `folder`: the stored results of `diffembed evaluate` in `results` (default:
    FOLDER/eval) read by the evaluation wing and handed to the card builder."""
    from diffembed_hf.evaluation.card import stored_results
    from diffembed_hf.model_card import build_model_card

    stored = stored_results(folder, results)
    return build_model_card(folder, repo_id, eval_results=stored.eval_results if stored else None,
                            extra_sections=["\n".join(stored.lines)] if stored else ())
