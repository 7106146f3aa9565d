"""Stored evaluation results (`diffembed evaluate --output DIR`) as model-card lines and Hub `model-index` entries.

Reads only `summary.json` and `run.json` (no mteb needed to push). Each task and split/subset becomes one
huggingface_hub `EvalResult` with its main score (mteb's raw value, as mteb's own card export writes it); the
card's table gives every task in percent with the study's published DiffEmbed numbers beside ours.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult

from . import EvaluationError
from .suites import STUDY, STUDY_URL

# mteb task type -> the Hub's task type (the mapping mteb's own card export uses)
HF_TASK_TYPES = {
    "Retrieval": "text-retrieval", "InstructionRetrieval": "text-retrieval", "Reranking": "text-ranking",
    "InstructionReranking": "text-ranking", "Classification": "text-classification",
    "MultilabelClassification": "text-classification", "Clustering": "text-classification",
    "PairClassification": "text-classification", "STS": "sentence-similarity",
}


@dataclass
class CardResults:
    lines: list[str]  # markdown: a results section
    eval_results: list[EvalResult]  # for ModelCardData(eval_results=..., model_name=...)


def load_results(folder: Path) -> tuple[dict, dict]:
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvaluationError(f"{folder}: no readable evaluation results (summary.json, run.json from "
                              f"`diffembed evaluate --output {folder}`): {err}") from None
    return summary, record


def _is_hub_dataset(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path or ""))


def eval_results(summary: dict, record: dict) -> list[EvalResult]:
    results = []
    for task, scores in summary.items():
        info = record.get("tasks", {}).get(task, {})
        dataset = info.get("dataset", "")
        parts = scores.get("splits") or {info.get("splits", ["test"])[0]: scores}
        for label, values in parts.items():
            split, _, subset = label.partition("/")
            subset = subset or (info.get("subsets") or ["default"])[0]
            results.append(EvalResult(
                task_type=HF_TASK_TYPES.get(info.get("type"), "feature-extraction"), task_name=info.get("type"),
                dataset_type=dataset if _is_hub_dataset(dataset) else f"local/{task}",
                dataset_name=f"{task} ({subset})" if subset != "default" else task, dataset_config=subset,
                dataset_split=split, dataset_revision=info.get("dataset_revision"),
                metric_type=scores["metric"], metric_name=scores["metric"], metric_value=values["main_score"],
                source_name="diffembed evaluate (mteb)", source_url="https://github.com/embeddings-benchmark/mteb",
            ))
    return results


def results_lines(summary: dict, record: dict) -> list[str]:
    from .run import results_table

    rows = results_table(summary)
    lines = [
        "## Benchmark results", "",
        f"`diffembed evaluate` on mteb {record.get('mteb_version', '?')}"
        + (f", suite `{record['suite']}`" if record.get("suite") else "")
        + f", inputs up to {record.get('max_seq_length')} tokens; scores in percent. Queries carry each task's "
        "instruction, documents none (the instructions used are in `run.json`)"
        + (f"; the study's published numbers ([{STUDY}]({STUDY_URL})) are beside ours." if any(
            r[3] is not None for r in rows) else "."), "",
        "| task | metric | this model | study |", "|---|---|---:|---:|",
    ]
    for task, label, ours, study in rows:
        lines.append(f"| {task} | {label} | {'-' if ours is None else f'{ours:.2f}'} | "
                     f"{'' if study is None else f'{study:.2f}'} |")
    return [*lines, ""]


def card_results(folder: str | Path) -> CardResults:
    """The card section and the `model-index` entries for the results stored in `folder`."""
    summary, record = load_results(Path(folder))
    if not summary:
        raise EvaluationError(f"{folder}/summary.json holds no task")
    vectors = record.get("vectors") or {}
    if vectors.get("truncate_dim") is not None or vectors.get("precision", "float32") != "float32":
        # the card's model-index states the model's scores: those of its full float vectors
        raise EvaluationError(f"{folder} holds results of compact vectors ({vectors.get('dim')} dims, "
                              f"{vectors.get('precision')}), not the model's own; evaluate without --truncate-dim and "
                              "--precision for the card")
    return CardResults(results_lines(summary, record), eval_results(summary, record))
