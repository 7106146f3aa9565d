"""Stored evaluation results (`diffembed evaluate --output DIR`) as model-card lines and Hub `model-index` entries.

Reads only `summary.json` (no mteb needed to push), and only the results of the model the card describes: the
summary names the model that made its results (`evaluation.summary`), which must be the card's folder (same
content digest). Each task, settings group and split/subset becomes one huggingface_hub `EvalResult` with its
main score (mteb's raw value, as mteb's own card export writes it); the card's table gives every result in
percent with the study's published DiffEmbed numbers beside ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult

from ..model_folder import EVAL_FOLDER, is_hub_id, model_identity, read_json_or_empty
from ..errors import EvaluationError
from .suites import STUDY, STUDY_URL
from .summary import (Summary, compact_label, describe_model, identity_record, read_summary, results_table, same_model,
                      settings_labels)

logger = logging.getLogger(__name__)

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


def load_results(folder: Path) -> Summary:
    summary = read_summary(folder)
    if summary is None:
        raise EvaluationError(f"{folder}: no readable evaluation results (summary.json from `diffembed evaluate "
                              f"--output {folder}`)")
    if not summary.results:
        raise EvaluationError(f"{folder}/summary.json holds no result")
    return summary


def eval_results(results: list[dict]) -> list[EvalResult]:
    labels = settings_labels(results) or [None] * len(results)
    entries = []
    for result, label in zip(results, labels):
        task, scores = result["task"], result["scores"]
        dataset = result.get("dataset", "")
        parts = scores.get("splits") or {(result.get("splits") or ["test"])[0]: scores}
        for part, values in parts.items():
            split, _, subset = part.partition("/")
            subset = subset or (result.get("subsets") or ["default"])[0]
            # the Hub groups entries by task, dataset, config, split and revision: results of one task under other
            # settings are metrics of one entry, told apart by their name
            entries.append(EvalResult(
                task_type=HF_TASK_TYPES.get(result.get("type"), "feature-extraction"), task_name=result.get("type"),
                dataset_type=dataset if is_hub_id(dataset) else f"local/{task}",
                dataset_name=f"{task} ({subset})" if subset != "default" else task, dataset_config=subset,
                dataset_split=split, dataset_revision=result.get("dataset_revision"), metric_type=scores["metric"],
                metric_name=f"{scores['metric']} ({label})" if label else scores["metric"],
                metric_value=values["main_score"],
                source_name="diffembed evaluate (mteb)", source_url="https://github.com/embeddings-benchmark/mteb",
            ))
    return entries


def results_lines(results: list[dict]) -> list[str]:
    rows = results_table(results)
    with_settings = any(r[1] is not None for r in rows)
    versions = sorted({r.get("mteb_version", "?") for r in results})
    lengths = sorted({r["settings"].get("max_seq_length") for r in results})
    lines = [
        "## Benchmark results", "",
        f"`diffembed evaluate` on mteb {', '.join(versions)}"
        + ("" if with_settings else f", inputs up to {lengths[0]} tokens") + "; scores in percent. Queries carry "
        "each task's instruction, documents none (the prompts used are in `summary.json`)"
        + ("; results of the same model under other settings (input length, prompts) are listed by settings"
           if with_settings else "")
        + (f"; the study's published numbers ([{STUDY}]({STUDY_URL})) are beside ours." if any(
            r[4] is not None for r in rows) else "."), "",
    ]
    if with_settings:
        lines += ["| task | settings | metric | this model | study |", "|---|---|---|---:|---:|"]
    else:
        lines += ["| task | metric | this model | study |", "|---|---|---:|---:|"]
    for task, label, metric, ours, study, _ in rows:
        cells = [task, *([label.replace("|", "\\|")] if with_settings else []), metric,
                 "-" if ours is None else f"{ours:.2f}", "" if study is None else f"{study:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def card_results(results_folder: str | Path, model_folder: str | Path, *, strict: bool) -> CardResults | None:
    """The card section and the `model-index` entries for the results stored in `results_folder`, when they were
    made by the model in `model_folder`. Another model's results (or results that name no model) are an
    EvaluationError naming both when `strict` (the user asked for these results), else left off with a warning
    (None)."""
    results_folder = Path(results_folder)
    summary = load_results(results_folder)
    identity = model_identity(model_folder)
    if not same_model(summary.model, identity):
        problem = (f"{results_folder} holds the results of {describe_model(summary.model)}, not of "
                   f"{describe_model(identity_record(identity))}")
        if strict:
            raise EvaluationError(f"{problem}; evaluate this model (diffembed evaluate {model_folder} ... --output "
                                  "DIR) and give those results")
        logger.warning("%s: left off the card of %s", problem, model_folder)
        return None
    # a card states what the model's vectors score: its float vectors at the dimension it stores as its default
    # (`diffembed evaluate` uses it unless told otherwise); those of other truncations or precisions are in
    # summary.json
    default_dim = stored_truncate_dim(Path(model_folder))
    results = [r for r in summary.results if _default_vectors(r["settings"].get("compact"), default_dim)]
    if not results:
        compact = [r["settings"]["compact"] for r in summary.results]
        options = [option for option, made in (
            ("--truncate-dim", any(c.get("truncate_dim") != default_dim for c in compact)),
            ("--precision", any(c.get("precision", "float32") != "float32" for c in compact)),
            ("--rescore", any(c.get("rescore") for c in compact))) if made]
        own = f"its first {default_dim} dimensions" if default_dim else "its full vectors"
        labels = ", ".join(sorted({compact_label(c) for c in compact}))
        problem = (f"{results_folder} holds only results of compact vectors ({labels}), not of the model's own "
                   f"({own}, float32)")
        if strict:
            raise EvaluationError(f"{problem}; evaluate it without {' / '.join(options)} for the card")
        logger.warning("%s: left off the card of %s", problem, model_folder)
        return None
    lines = results_lines(results)
    if default_dim:
        lines[2:2] = [f"Scores of the model's default vectors: their first {default_dim} dimensions (the "
                      "`truncate_dim` it stores), renormalised.", ""]
    return CardResults(lines, eval_results(results))


def stored_results(folder: str | Path, results: str | Path | None = None, *,
                   model: str | Path | None = None) -> CardResults | None:
    """The results `diffembed evaluate` stored in `results` (default: FOLDER/eval, when it holds any) as a card
    section and `EvalResult`s, or None: what `push` hands the card builder.

    Only results made by `model` (default: `folder`; the same content digest) count: another model's results in
    FOLDER/eval are left off with a warning, and `results` given explicitly that are another model's are an
    EvaluationError naming both."""
    strict = results is not None
    if results is None:
        results = Path(folder) / EVAL_FOLDER
        if not (results / Summary.FILE).is_file():
            return None
    return card_results(results, model or folder, strict=strict)


def stored_truncate_dim(folder: Path) -> int | None:
    """The `truncate_dim` a model folder stores (config_sentence_transformers.json): its vectors' default
    dimension, which sentence-transformers and `diffembed evaluate` use unless told otherwise."""
    stored = read_json_or_empty(folder / "config_sentence_transformers.json", EvaluationError)
    value = stored.get("truncate_dim") if isinstance(stored, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _default_vectors(compact: dict | None, default_dim: int | None) -> bool:
    """Whether a result's vectors are the model's own: float32, uncut or cut to its stored default dimension."""
    if not compact:
        return True
    return (compact.get("truncate_dim") == default_dim and compact.get("precision", "float32") == "float32"
            and not compact.get("rescore") and not compact.get("calibration"))
