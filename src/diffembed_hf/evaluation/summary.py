"""`summary.json`: every result `diffembed evaluate` keeps in an output folder, and the model that made them.

Format (version 2)::

    {"format": "diffembed-evaluate-summary", "version": 2,
     "model": {"model": ..., "revision": ..., "model_sha256": ..., "key": ...},   # checkpoint.model_identity
     "results": [{"task": ..., "settings": {...}, "settings_key": ..., "scores": {"main_score", "metric", ...},
                  "type", "dataset", "dataset_revision", "splits", "subsets", "prompts", "mteb_version",
                  "diffembed_hf_version", "evaluated"}, ...]}

One output folder holds one model's results: `model` names it (a local folder's content digest, or a Hub id and
commit), and a run of another model into the folder is refused (its results would otherwise be read as this
model's). A result is one task under one group of settings: the input length and the prompts each side of the
task received (plus the row count of `--suite stdlib`); a later run replaces the result of the same task and
settings and keeps every other. A `summary.json` written before version 2 (`{task: scores}`, no model named) is
read as results of an unidentified model: the card leaves them off, push refuses them, and evaluate replaces them
only with --overwrite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..model_folder import EVAL_SUMMARY, ModelIdentity, read_json, settings_digest
from ..errors import EvaluationError
from .suites import PUBLISHED, STUDY

logger = logging.getLogger(__name__)

FORMAT = "diffembed-evaluate-summary"
VERSION = 2


@dataclass
class Summary:
    """`summary.json`: the model that made the results and the results. `model` is None for a version-1 file,
    which named no model; `path` is where it was read from (no part of the JSON)."""

    FILE: ClassVar[str] = EVAL_SUMMARY

    model: dict[str, Any] | None
    results: list[dict[str, Any]]
    version: int = VERSION
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "model": self.model, "results": self.results}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = FILE) -> Summary:
        """The summary in `data`; anything else (another format, a damaged one) is an EvaluationError naming
        `source`."""
        if isinstance(data, dict) and data.get("format") == FORMAT:
            if data.get("version") != VERSION:
                raise EvaluationError(f"{source} has summary format version {data.get('version')!r}; this "
                                      f"diffembed-hf reads version {VERSION} (upgrade diffembed-hf)")
            model, results = data.get("model"), data.get("results")
            if not isinstance(model, dict) or not isinstance(results, list) or not all(_is_result(r) for r in results):
                raise EvaluationError(f"{source}: damaged summary (expected a model and a list of results, each with "
                                      "its task, settings and scores)")
            return cls(model, results, VERSION, Path(source))
        if isinstance(data, dict) and data and all(isinstance(v, dict) and "main_score" in v for v in data.values()):
            return cls(None, [{"task": task, "settings": {}, "settings_key": "", "scores": scores}
                              for task, scores in data.items()], 1, Path(source))
        raise EvaluationError(f"{source} is not a summary.json of `diffembed evaluate`")


def identity_record(identity: ModelIdentity) -> dict[str, Any]:
    return {**identity.as_dict(), "key": identity.key}


def describe_model(model: dict[str, Any] | None) -> str:
    """A model as a message names it: its folder (or Hub id) and the digest (or commit) that identifies it."""
    if not model:
        return "an unidentified model (a summary.json written before diffembed-hf recorded the model)"
    if model.get("model_sha256"):
        return f"{model.get('model')} (content sha256 {model['model_sha256'][:12]})"
    return f"{model.get('model')} (revision {model.get('revision') or 'unknown'})"


def same_model(recorded: dict[str, Any] | None, identity: ModelIdentity) -> bool:
    """Whether results recorded for `recorded` were made by `identity`: equal content digests for local folders
    (wherever the folder now is), equal Hub id and commit otherwise."""
    if not recorded:
        return False
    if identity.sha256 or recorded.get("model_sha256"):
        return recorded.get("model_sha256") == identity.sha256
    return (recorded.get("model"), recorded.get("revision")) == (identity.model, identity.revision)


def read_summary(folder: Path) -> Summary | None:
    """`folder`/summary.json, or None when there is none; an unreadable or unknown file is an EvaluationError."""
    path = Path(folder) / Summary.FILE
    if not path.is_file():
        return None
    return Summary.from_dict(read_json(path, EvaluationError), source=path)


def _is_result(result: Any) -> bool:
    return (isinstance(result, dict) and isinstance(result.get("task"), str)
            and isinstance(result.get("settings"), dict) and isinstance(result.get("scores"), dict)
            and "main_score" in result["scores"] and "metric" in result["scores"])


def settings_key(settings: dict[str, Any]) -> str:
    return settings_digest(settings)[:12]


def merge_results(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`earlier` with each result of the same task and settings as one in `new` replaced (in its place), and the
    other new results after them."""
    new_by_key = {(r["task"], r["settings_key"]): r for r in new}
    kept = [new_by_key.pop((r["task"], r["settings_key"]), r) for r in earlier]
    return kept + list(new_by_key.values())


# ----------------------------------------------------------------------------------------------------------
# Tables: ours beside the study's published numbers, with the settings when they differ
# ----------------------------------------------------------------------------------------------------------


def _short(text: str, width: int = 28) -> str:
    text = repr(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def settings_labels(results: list[dict[str, Any]]) -> list[str] | None:
    """One label per result naming its settings (the input length, and whatever else differs between the
    results of its task), or None when every result shares one group of settings (then nothing needs naming)."""
    lengths = {r["settings"].get("max_seq_length") for r in results}
    tasks = [r["task"] for r in results]
    if len(lengths) <= 1 and len(set(tasks)) == len(tasks):
        return None
    labels = []
    for result in results:
        settings = result["settings"]
        siblings = [r["settings"] for r in results if r["task"] == result["task"]]
        parts = [f"{settings.get('max_seq_length')} tokens"]
        for key, name in (("query_prompt", "query prompt"), ("document_prompt", "document prompt"),
                          ("max_heldout", "rows")):
            if key in settings and any(s.get(key) != settings[key] for s in siblings):
                value = settings[key]
                parts.append(f"{value} {name}" if key == "max_heldout" else f"{name} {_short(value)}")
        if any(s.get("compact") != settings.get("compact") for s in siblings):
            parts.append(compact_label(settings.get("compact")))
        labels.append(", ".join(parts))
    return labels


def compact_label(compact: dict[str, Any] | None) -> str:
    """A result's vectors in words: 'float32', '256 dims, binary + rescore 100'."""
    if not compact:
        return "float32"
    parts = [f"{compact['truncate_dim']} dims"] if compact.get("truncate_dim") else []
    parts.append(compact.get("precision", "float32") + (f" + rescore {compact['rescore']}" if compact.get("rescore")
                                                        else ""))
    return ", ".join(parts)


def _published_value(scores: dict[str, Any], metric: str, splits: tuple[str, ...] | None) -> float | None:
    if splits:
        values = [scores.get("splits", {}).get(s, {}).get(metric) for s in splits]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    return scores.get(metric)


def results_table(results: list[dict[str, Any]]
                  ) -> list[tuple[str, str | None, str, float | None, float | None, int | None]]:
    """(task, settings label or None, metric label, ours in %, the study's in %, bytes per vector) rows: every
    published number for the tasks run, else the task's main score."""
    labels = settings_labels(results) or [None] * len(results)
    rows = []
    for result, label in zip(results, labels):
        task, scores = result["task"], result["scores"]
        published = PUBLISHED.get(task)
        if not published:
            rows.append((task, label, scores["metric"], 100 * scores["main_score"], None,
                         scores.get("bytes_per_vector")))
            continue
        for number in published:
            ours = _published_value(scores, number.metric, number.splits)
            rows.append((task, label, number.label, None if ours is None else 100 * ours, number.value,
                         scores.get("bytes_per_vector")))
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    """The table `diffembed evaluate` prints."""
    rows = results_table(results)
    width = max([len("task")] + [len(r[0]) for r in rows])
    with_settings = any(r[1] is not None for r in rows)
    settings_width = max([len("settings")] + [len(r[1] or "") for r in rows]) + 2 if with_settings else 0
    header = f"{'task':<{width}}  " + (f"{'settings':<{settings_width}}" if with_settings else "")
    lines = [header + f"{'metric':<16}{'ours':>8}{'study':>8}{'bytes/vector':>14}"]
    for task, label, metric, ours, study, size in rows:
        lines.append(f"{task:<{width}}  " + (f"{label:<{settings_width}}" if with_settings else "")
                     + f"{metric:<16}{'-' if ours is None else f'{ours:.2f}':>8}"
                     + f"{'' if study is None else f'{study:.2f}':>8}{'' if size is None else f'{size:,}':>14}")
    if any(r[4] is not None for r in rows):
        lines.append(f"study: {STUDY} (percent)")
    return "\n".join(lines)
