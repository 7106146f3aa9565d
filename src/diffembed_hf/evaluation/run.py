"""`evaluate`: a DiffEmbed model on the study's suites, named mteb tasks or local BEIR folders, on stock mteb.

The output folder only ever holds finished results: mteb writes its per-task result files into a staging
folder beside it (`.<name>.partial`), which an interrupted run leaves behind and the next run resumes from
(mteb's `only-missing` cache strategy); on success `summary.json` and `run.json` are added and the staging
folder replaces the output folder in one rename. Results of other models already in the output are kept:
mteb files them under each model's own name and revision.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import move_into_place, remove_stale_temp_folders, temporary_sibling
from ..errors import EvaluationError, require_extra
from .suites import PUBLISHED, STUDY, SUITE_MAX_SEQ_LENGTH, close_matches, suite_task, suite_tasks

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
RUN_RECORD = "run.json"


@dataclass
class EvaluationResult:
    output: Path
    summary: dict[str, dict[str, Any]]  # task -> {"main_score", "metric", every metric mteb reports}
    table: str  # ours beside the study's published numbers
    record: dict[str, Any]  # run.json: model identity, settings, per-task dataset and instruction


def require_mteb():
    require_extra("eval", what="evaluation")
    import mteb

    return mteb


def _mteb_task(mteb, name: str):
    selection = suite_task(name)
    try:
        return mteb.get_task(name, hf_subsets=list(selection.hf_subsets) if selection.hf_subsets else None,
                             eval_splits=list(selection.eval_splits) if selection.eval_splits else None)
    except KeyError:
        known = [t.metadata.name for t in mteb.get_tasks(exclude_superseded=False)]
        raise EvaluationError(f"unknown mteb task {name!r}{close_matches(name, known)}") from None


def resolve_tasks(*, suite: str | None, tasks: list[str] | None, data: list[str | Path] | None,
                  stdlib_rows: int) -> list:
    """mteb task objects for exactly one of suite / tasks / data; names are checked before any model loads."""
    if sum(x is not None and x != [] for x in (suite, tasks, data)) != 1:
        raise EvaluationError("give exactly one of a suite, task names or local data folders")
    mteb = require_mteb()
    if suite is not None:
        if suite == "stdlib":
            from .local import stdlib_task

            return [stdlib_task(stdlib_rows)]
        return [_mteb_task(mteb, t.name) for t in suite_tasks(suite)]
    if tasks is not None:
        return [_mteb_task(mteb, name) for name in tasks]
    from .local import beir_task

    resolved = [beir_task(folder) for folder in data]
    names = [t.metadata.name for t in resolved]
    if len(set(names)) != len(names):
        raise EvaluationError(f"two data folders give the same task name: {names}; rename one folder")
    return resolved


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise EvaluationError(f"--output {output} is a file")
    ours = (output / SUMMARY).is_file() or (output / "results").is_dir()
    if output.is_dir() and any(output.iterdir()) and not ours:
        raise EvaluationError(f"--output {output} is a non-empty folder that holds no evaluation results; "
                              "give a new or empty folder")


def _staging(output: Path, overwrite: bool) -> Path:
    """The staging folder: resumed if an interrupted run left one, else seeded with the output's results."""
    work = output.parent / f".{output.name}.partial"
    if overwrite and work.exists():
        shutil.rmtree(work)
    if not work.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_folders(output)
        seed = temporary_sibling(output)
        seed.mkdir()
        if (output / "results").is_dir():
            shutil.copytree(output / "results", seed / "results")
        seed.rename(work)
    else:
        logger.warning("Resuming the interrupted evaluation into %s (--overwrite starts it again)", output)
    from mteb import TaskResult

    for path in (work / "results").rglob("*.json") if (work / "results").is_dir() else []:
        if path.name in ("model_meta.json",):
            continue
        try:
            TaskResult.from_disk(path)
        except Exception:  # a result file cut short when the run was killed: that task runs again
            logger.warning("Discarding the unreadable result file %s", path)
            path.unlink()
    return work


def _keep_earlier_tasks(output: Path, summary: dict, record: dict) -> tuple[dict, dict]:
    """Results of the same model and settings already in `output` for other tasks (an earlier suite) stay in
    summary.json and run.json, so a second suite into MODEL/eval adds to the card instead of replacing it."""
    try:
        old_summary = json.loads((output / SUMMARY).read_text(encoding="utf-8"))
        old_record = json.loads((output / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return summary, record
    # the model and its length; the prompts are per task (each task's own are in run.json)
    same = all(old_record.get(key) == record.get(key) for key in ("mteb_model_name", "mteb_revision", "max_seq_length"))
    if not same:  # another model (or settings) before: its results are not this model's
        return summary, record
    tasks = {**old_record.get("tasks", {}), **record.get("tasks", {})}
    return {**old_summary, **summary}, {**record, "tasks": tasks}


def _is_network_error(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return True
        http_library = type(err).__module__.startswith(("requests", "httpx", "urllib3"))
        if http_library and "connect" in type(err).__name__.lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def _flatten(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            # undefined metrics (mteb's nAUC on tiny sets is NaN) are stored as null, never as a number
            flat[f"{prefix}{key}"] = float(value) if math.isfinite(value) else None
    return flat


def summarize(task, task_result) -> dict[str, Any]:
    """{"main_score", "metric", every metric mteb reports}: averaged over splits and subsets when there are
    several (each one also under "splits"), as mteb's own main score is."""
    entries = {}
    for split, scores in task_result.scores.items():
        if split not in task.eval_splits:
            continue
        for score in scores:
            if score.get("hf_subset", "default") in task.hf_subsets:
                label = split if len(task.hf_subsets) == 1 else f"{split}/{score.get('hf_subset')}"
                entries[label] = _flatten({k: v for k, v in score.items() if k not in ("hf_subset", "languages")})
    if not entries:
        raise RuntimeError(f"mteb returned no scores for {task.metadata.name}")
    keys = set.intersection(*(set(e) for e in entries.values()))
    mean = {}
    for key in sorted(keys):
        values = [e[key] for e in entries.values() if e[key] is not None]
        mean[key] = sum(values) / len(values) if values else None
    if mean.get("main_score") is None:
        raise FloatingPointError(f"{task.metadata.name}: mteb's main score is not a finite number")
    summary = {"main_score": mean.pop("main_score"), "metric": task.metadata.main_score, **mean}
    if len(entries) > 1:
        summary["splits"] = entries
    return summary


def _published_value(summary: dict[str, Any], metric: str, splits: tuple[str, ...] | None) -> float | None:
    if splits:
        values = [summary.get("splits", {}).get(s, {}).get(metric) for s in splits]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    return summary.get(metric)


def results_table(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, float | None, float | None]]:
    """(task, metric label, ours in %, the study's in %) rows: every published number for the tasks run, else the
    task's main score."""
    rows = []
    for task, scores in summary.items():
        published = PUBLISHED.get(task)
        if not published:
            rows.append((task, scores["metric"], 100 * scores["main_score"], None))
            continue
        for number in published:
            ours = _published_value(scores, number.metric, number.splits)
            rows.append((task, number.label, None if ours is None else 100 * ours, number.value))
    return rows


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    rows = results_table(summary)
    width = max([len("task")] + [len(r[0]) for r in rows])
    lines = [f"{'task':<{width}}  {'metric':<16}{'ours':>8}{'study':>8}"]
    for task, label, ours, study in rows:
        lines.append(f"{task:<{width}}  {label:<16}{'-' if ours is None else f'{ours:.2f}':>8}"
                     f"{'' if study is None else f'{study:.2f}':>8}")
    if any(r[3] is not None for r in rows):
        lines.append(f"study: {STUDY} (percent)")
    return "\n".join(lines)


def evaluate(
    model: str,
    *,
    suite: str | None = None,
    tasks: list[str] | None = None,
    data: list[str | Path] | str | Path | None = None,
    output: str | Path,
    instructions: str | Path | dict[str, str] | None = None,
    query_prompt: str | None = None,
    max_seq_length: int | None = None,
    max_tokens_per_batch: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    stdlib_rows: int | None = None,
    trust_remote_code: bool = False,
) -> EvaluationResult:
    """Evaluate `model` (a DiffEmbed folder or Hub id, loaded as a user would: sentence-transformers with
    `trust_remote_code=True`) and write mteb's result files, `summary.json` and `run.json` under `output`.

    `instructions`: a JSON file (or dict) of task name -> instruction, over the study's. `query_prompt`: the text
    before each query of local `data` tasks (default: the model's stored `query` prompt). `max_seq_length`
    defaults to the suite's protocol (longembed 4096, followir 304, stdlib 128) or else the model's own.
    `overwrite=True` recomputes this model's results instead of reusing those already in `output`.
    """
    mteb = require_mteb()
    if isinstance(data, (str, Path)):
        data = [data]
    output = Path(output).expanduser().resolve()
    from .local import STDLIB_ROWS, STDLIB_TASK

    task_list = resolve_tasks(suite=suite, tasks=tasks, data=data, stdlib_rows=stdlib_rows or STDLIB_ROWS)
    overrides = _read_instructions(instructions)
    unknown = sorted(set(overrides) - {t.metadata.name for t in task_list})
    if unknown:
        raise EvaluationError(f"the instruction file names tasks that are not evaluated: {unknown}")
    _check_output(output)

    from ..encoding import load_encoder
    from ..checkpoint import settings_digest
    from .encoder import DiffEmbedEncoder, model_identity, model_meta

    length = max_seq_length or SUITE_MAX_SEQ_LENGTH.get(suite or "")
    st_model = load_encoder(model, device=device, max_seq_length=length, trust_remote_code=trust_remote_code)
    query_prompts = {}
    if suite == "stdlib":
        query_prompts[STDLIB_TASK] = ""  # the anchors already carry the task's instruction
    for task in task_list if data else []:
        query_prompts[task.metadata.name] = st_model.prompts.get("query", "") if query_prompt is None else query_prompt
    name, revision = model_identity(model)
    settings = {"max_seq_length": st_model.max_seq_length}
    if overrides or query_prompts:
        settings["prompts"] = settings_digest({"instructions": overrides, "query_prompts": query_prompts})[:12]
    meta = model_meta(st_model, name, revision, settings)
    encoder = DiffEmbedEncoder(st_model, meta, instructions=overrides, query_prompts=query_prompts,
                               source=None if device else model,
                               **({"max_tokens_per_batch": max_tokens_per_batch} if max_tokens_per_batch else {}))

    fresh = not (output.parent / f".{output.name}.partial").exists()
    work = _staging(output, overwrite)
    seeded = set(work.rglob("*.json"))
    try:
        summary, record = _run(mteb, encoder, task_list, work, meta, overwrite=overwrite)
    except EvaluationError:
        if fresh and set(work.rglob("*.json")) == seeded:  # nothing of this run to resume: leave no trace
            shutil.rmtree(work, ignore_errors=True)
        raise
    record = {"model": model, "mteb_model_name": name, "mteb_revision": revision, "settings": settings,
              "suite": suite, "max_seq_length": st_model.max_seq_length, "mteb_version": mteb.__version__, **record}
    summary, record = _keep_earlier_tasks(output, summary, record)
    (work / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (work / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    move_into_place(work, output)  # whole, with the user's umask; the old output is put back if it fails
    table = format_table(summary)
    logger.debug("Evaluation results in %s\n%s", output, table)  # the CLI prints the table once
    return EvaluationResult(output, summary, table, record)


def _run(mteb, encoder, task_list: list, work: Path, meta, *, overwrite: bool) -> tuple[dict, dict]:
    """mteb.evaluate task by task into the staging folder's result cache; (summary, the run record's tasks)."""
    cache = mteb.ResultCache(work)
    summary, record_tasks = {}, {}
    for task in task_list:
        task_name = task.metadata.name
        _drop_stale(cache, task, meta)
        try:
            result = mteb.evaluate(encoder, task, cache=cache, overwrite_strategy="always" if overwrite else
                                   "only-missing", co2_tracker=False,
                                   encode_kwargs={"show_progress_bar": False},
                                   public_only=False, show_progress_bar=False)
        except Exception as err:
            if _is_network_error(err):
                offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
                raise EvaluationError(
                    f"{task_name} needs its dataset {task.metadata.dataset['path']} from the Hugging Face Hub, which "
                    f"cannot be reached{offline}; run once with network access to cache it, or evaluate offline "
                    "with --data FOLDER or --suite stdlib") from None
            raise
        # read back from mteb's result file, so a fresh and a cached result give the same summary
        stored = cache.load_task_result(task_name, meta) or result.task_results[0]
        summary[task_name] = summarize(task, stored)
        record_tasks[task_name] = {
            "type": task.metadata.type, "dataset": task.metadata.dataset["path"],
            "dataset_revision": task.metadata.dataset.get("revision"), "splits": list(task.eval_splits),
            "subsets": list(task.hf_subsets), "main_score": task.metadata.main_score,
            "routing": encoder.routing(task.metadata),
            **({"prompts_sent": encoder.used[task_name]} if task_name in encoder.used else {}),
        }
    folder = cache.get_task_result_path(task_list[0].metadata.name, meta).parent.relative_to(work)
    return summary, {"result_folder": str(folder), "tasks": record_tasks}


def _drop_stale(cache, task, meta) -> None:
    """A cached result for other data (a local folder edited since, another dataset revision) is removed, so that
    the task runs again instead of mteb's only-missing strategy reusing it."""
    path = cache.get_task_result_path(task.metadata.name, meta)
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8")).get("dataset_revision")
        if cached != task.metadata.dataset.get("revision"):
            logger.warning("%s: cached results are for dataset revision %s, not %s; recomputing",
                           task.metadata.name, cached, task.metadata.dataset.get("revision"))
            path.unlink()


def _read_instructions(source: str | Path | dict[str, str] | None) -> dict[str, str]:
    if source is None or isinstance(source, dict):
        return dict(source or {})
    path = Path(source)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvaluationError(f"--instructions {path}: cannot be read as JSON ({err})") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise EvaluationError(f"--instructions {path}: expected a JSON object of task name -> instruction text")
    return values

