"""`evaluate`: a DiffEmbed model on the study's suites, named mteb tasks or local BEIR folders, on stock mteb.

One run at a time writes an output (`files.output_lock`: a second run is refused at once, naming the first).
The output folder only ever holds finished results: mteb writes its per-task result files into the staging folder
`files.staged_folder(..., resumable=True)` keeps beside it (`.<name>.partial`), which an interrupted run leaves
behind and the next run of the same model resumes from (mteb's `only-missing` cache strategy); on success
`summary.json` and `run.json` are added and the staging folder replaces the output folder in one rename.
An output holds one model's results (`evaluation.summary`): those of the same model with other tasks or settings
are kept, another model's are refused unless --overwrite replaces them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import __version__
from ..packed_encoder import DEFAULT_MAX_TOKENS_PER_BATCH
from ..model_folder import EVAL_RUN, ModelFolder, ModelIdentity, as_model_folder, model_identity
from ..compact import DEFAULT_CALIBRATION_ROWS, CalibrationRanges, Compaction, load_calibration
from ..errors import EvaluationError, OptionError, OutputExistsError, require_extra
from ..outputs import output_lock, partial_folder, staged_folder, write_json
from ..validation import check_max_seq_length, check_positive_int, is_positive_int, read_options, with_overrides
from .suites import SUITE_MAX_SEQ_LENGTH, close_matches, suite_task, suite_tasks
from .summary import (
    Summary,
    describe_model,
    format_table,
    identity_record,
    merge_results,
    read_summary,
    same_model,
    settings_key,
)

logger = logging.getLogger(__name__)

SUMMARY = Summary.FILE


@dataclass
class EvaluationResult:
    output: Path
    summary: dict[str, dict[str, Any]]  # this run: task -> {"main_score", "metric", every metric mteb reports}
    table: str  # every result in the output, ours beside the study's published numbers
    record: dict[str, Any]  # run.json (`RunRecord.to_dict`): this run's model, settings, per-task dataset and prompts
    results: list[dict[str, Any]] = field(default_factory=list)  # summary.json's results: this run's and earlier


@dataclass
class RunRecord:
    """`run.json`: the latest run into an output folder. Written when the run starts (`finished` false: the model
    only, so that only a rerun of the same model resumes its staging folder) and again when it ends."""

    FILE: ClassVar[str] = EVAL_RUN

    model: str | None
    identity: dict[str, Any] | None  # evaluation.summary.identity_record
    finished: bool = False
    mteb_model_name: str | None = None
    mteb_revision: str | None = None
    suite: str | None = None
    max_seq_length: int | None = None
    mteb_version: str | None = None
    diffembed_hf_version: str | None = None
    evaluated: str | None = None  # local time, "%Y-%m-%d %H:%M:%S"
    vectors: dict[str, Any] | None = None  # dim, bytes per vector, the compaction, calibration ranges per task
    tasks: dict[str, dict[str, Any]] | None = None  # per task: type, dataset, splits, result file, prompts

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return values if self.finished else {k: values[k] for k in ("model", "identity", "finished")}

    @classmethod
    def from_dict(cls, values: Any, source: str | Path = FILE) -> RunRecord:
        """The record in `values`; one that is not a JSON object, or names no model, is an EvaluationError."""
        if not isinstance(values, dict) or not isinstance(values.get("identity"), dict):
            raise EvaluationError(f"{source} is not a run.json of `diffembed evaluate` (no model identity)")
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        """The record in `folder`; None when it has none or it cannot be read (a run killed while writing it)."""
        try:
            return cls.from_dict(json.loads((folder / cls.FILE).read_text(encoding="utf-8")), folder / cls.FILE)
        except (OSError, ValueError):
            return None


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


def _check_same_data(earlier: Summary | None, task_list: list, output: Path, overwrite: bool) -> None:
    """Results are kept by task name and settings, and a local task is named after its folder: another folder of
    the same name would replace the first one's results without a word. Refused unless --overwrite."""
    if earlier is None or overwrite:
        return
    recorded = {r["task"]: r.get("dataset") for r in earlier.results if r.get("dataset")}
    for task in task_list:
        name, path = task.metadata.name, task.metadata.dataset.get("path")
        if recorded.get(name, path) != path:
            raise EvaluationError(f"--output {output} holds the results of {name} from {recorded[name]}; {path} "
                                  "gives the same task name (its folder's name), so its results would replace "
                                  "those: evaluate it into another --output or rename its folder (--overwrite "
                                  "replaces them)")


def _earlier_results(output: Path, overwrite: bool) -> Summary | None:
    """The results already in `output`; a damaged summary.json is refused unless --overwrite replaces it."""
    try:
        return read_summary(output)
    except EvaluationError as err:
        if overwrite:
            return None
        raise EvaluationError(f"{err}; pass --overwrite to replace the results in {output}") from None


def _check_same_model(earlier: Summary | None, identity: ModelIdentity, output: Path, overwrite: bool) -> None:
    """One output folder holds one model's results: another model's are replaced only with --overwrite."""
    if earlier is None or overwrite or same_model(earlier.model, identity):
        return
    raise OutputExistsError(
        f"{output} holds the results of {describe_model(earlier.model)}, not of "
        f"{describe_model(identity_record(identity))}; give another --output, or pass --overwrite to replace them")


def _prepare_partial(output: Path, identity: ModelIdentity, overwrite: bool) -> None:
    """Keep the staging folder of an interrupted run only for the same model (its run.json names the model)."""
    work = partial_folder(output)
    if not work.exists():
        return
    if overwrite:
        shutil.rmtree(work)
        return
    owner = getattr(RunRecord.read(work), "identity", None)
    if same_model(owner, identity):
        logger.warning("Resuming the interrupted evaluation in %s", work)
        return
    logger.warning("Removing %s: it was left by an interrupted run of %s", work, describe_model(owner))
    shutil.rmtree(work)


def _seed(work: Path, output: Path) -> None:
    """Bring the output's mteb result files that the staging folder lacks into it (idempotent, so a run killed
    while seeding is completed by the next one); a file the staging folder already has is newer and kept."""
    source = output / "results"
    for path in sorted(source.rglob("*")) if source.is_dir() else []:
        target = work / "results" / path.relative_to(source)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _drop_unreadable(work: Path) -> None:
    from mteb import TaskResult

    for path in (work / "results").rglob("*.json") if (work / "results").is_dir() else []:
        if path.name == "model_meta.json":
            continue
        try:
            TaskResult.from_disk(path)
        except Exception:  # noqa: BLE001 - a result file cut short when the run was killed: that task runs again
            logger.warning("Discarding the unreadable result file %s", path)
            path.unlink()



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


@dataclass
class EvaluateOptions:
    """What `evaluate` runs and how: the tasks (exactly one of `suite`, `tasks`, `data`), their prompts, the
    model's settings and the compact vectors, checked once, here. Load them from JSON with `from_file`."""

    suite: str | None = None  # the study's suites (`suites.SUITES`), e.g. "longembed"
    tasks: list[str] | None = None  # mteb task names
    data: list[str | Path] | str | Path | None = None  # local BEIR folders
    instructions: str | Path | dict[str, str] | None = None  # task name -> instruction (a JSON file or a dict)
    query_prompt: str | None = None  # the instruction before the queries of `data` tasks
    max_seq_length: int | None = None  # None: the suite's protocol, else the model's own
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH  # real tokens per forward pass (no padding)
    stdlib_rows: int | None = None  # `suite="stdlib"`: the held-out rows of its task
    truncate_dim: int | None = None  # None: the model's stored one
    precision: str = "float32"  # compact.PRECISIONS; the compact ones on retrieval tasks
    rescore: int | None = None  # binary: candidates per query rescored with the float query
    calibration: CalibrationRanges | str | Path | None = None  # int8/uint8 ranges (None: from each corpus)
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS  # int8/uint8: each corpus's sample for its ranges
    device: str | None = None
    compile: bool = False  # torch.compile the model's forward
    overwrite: bool = False  # replace another model's results in the output
    trust_remote_code: bool = False

    def __post_init__(self):
        if isinstance(self.data, (str, Path)):
            self.data = [self.data]
        check_max_seq_length(self.max_seq_length)
        check_positive_int("max_tokens_per_batch", self.max_tokens_per_batch)
        check_positive_int("stdlib_rows", self.stdlib_rows, optional=True)
        check_positive_int("truncate_dim", self.truncate_dim, optional=True)
        if not is_positive_int(self.calibration_rows) or self.calibration_rows < 2:
            raise OptionError("calibration_rows", f"must be an integer >= 2, got {self.calibration_rows!r}")
        if isinstance(self.calibration, (str, Path)):
            self.calibration = load_calibration(self.calibration)
        self.compaction()  # precision and rescore
        # options that only some task sources use are refused with the others, never silently ignored
        if self.query_prompt is not None and not self.data:
            raise EvaluationError(
                "--query-prompt (query_prompt=) applies to --data tasks only: suite and mteb tasks put each task's "
                "own instruction before the queries (change it with --instructions FILE), and --suite stdlib's "
                "queries carry theirs already")
        if self.stdlib_rows is not None and self.suite != "stdlib":
            raise EvaluationError("--max-heldout (stdlib_rows=) applies to --suite stdlib only: it is the number "
                                  "of held-out rows of that task")

    def compaction(self) -> Compaction:
        """The truncation, precision, calibration and rescoring every task's vectors get."""
        return Compaction(self.truncate_dim, self.precision, self.calibration, self.rescore)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> EvaluateOptions:
        """The options a JSON file of field values sets, `overrides` winning; unknown keys are an error."""
        return read_options(cls, path, "evaluation", **overrides)


def evaluate(model: str, options: EvaluateOptions | None = None, *, output: str | Path,
             **overrides) -> EvaluationResult:
    """Evaluate `model` (a DiffEmbed folder or Hub id, loaded as a user would: sentence-transformers with
    `trust_remote_code=True`) and write mteb's result files, `summary.json` and `run.json` under `output`.
    `options` is an `EvaluateOptions`; its fields may also be given as keywords (`suite="longembed"`), over
    `options` where both are given.

    `instructions`: a JSON file (or dict) of task name -> instruction, over the study's (for local `data` tasks too,
    over `query_prompt`). `query_prompt`: the instruction before each query of local `data` tasks (default: the
    model's stored `query` prompt); both become prompts by the one rule, '<instruction>:\n'; refused for other
    tasks, as `stdlib_rows` (`--max-heldout`) is for anything but `suite="stdlib"`. `max_seq_length` defaults to
    the suite's protocol (longembed 4096, followir 304, stdlib 128) or else the model's own.

    `output` holds one model's results (`evaluation.summary`): the results of this model already there with other
    tasks or settings are kept, and another model's are refused unless `overwrite=True`, which replaces them
    (for this model's own results, `overwrite=True` recomputes those this run covers). A second run into the same
    output is refused while this one holds it.

    Compact vectors (`compact`): `truncate_dim` (default: the model's stored one) and `precision` apply to every
    task; int8/uint8/binary/ubinary to retrieval tasks, whose corpus is stored at that precision and searched by
    `evaluation.compact_search` (int8/uint8 ranges from a `calibration_rows` sample of each corpus, or the given
    `calibration`; binary by Hamming distance, `rescore` = candidates per query rescored with the float query).
    Each setting is a result of its own beside the float one; every result's scores carry `bytes_per_vector`.
    `compile` compiles the model's forward (`encoding.compile_backbone`).
    """
    options = with_overrides(EvaluateOptions, options, overrides)
    suite, data, precision, overwrite = options.suite, options.data, options.precision, options.overwrite
    mteb = require_mteb()
    output = Path(output).expanduser().resolve()
    from .local import STDLIB_ROWS

    task_list = resolve_tasks(suite=suite, tasks=options.tasks, data=data,
                              stdlib_rows=options.stdlib_rows or STDLIB_ROWS)
    instructions = _read_instructions(options.instructions)
    unknown = sorted(set(instructions) - {t.metadata.name for t in task_list})
    if unknown:
        raise EvaluationError(f"the instruction file names tasks that are not evaluated: {unknown}")

    if precision not in ("float32", "float16"):
        from mteb.abstasks import AbsTaskRetrieval

        other = [t.metadata.name for t in task_list if not isinstance(t, AbsTaskRetrieval)]
        if other:
            raise EvaluationError(f"precision {precision} is evaluated on retrieval tasks (a corpus stored at that "
                                  f"precision, searched by its queries); not on {', '.join(other)}")

    with output_lock(output):
        _check_output(output)
        earlier = _earlier_results(output, overwrite)
        _check_same_data(earlier, task_list, output, overwrite)
        # a local folder is read and checked once, here, and handed to the loader
        folder = as_model_folder(model, trust_remote_code=options.trust_remote_code)
        identity = None
        if folder is not None:  # a folder's identity is known before loading: another model's output is refused now
            identity = folder.identity
            _check_same_model(earlier, identity, output, overwrite)
        return _evaluate_locked(mteb, model, identity, earlier, task_list, instructions, options, output, folder)


def _evaluate_locked(mteb, model: str, identity: ModelIdentity | None, earlier: Summary | None, task_list: list,
                     overrides: dict[str, str], options: EvaluateOptions, output: Path,
                     folder: ModelFolder | None = None) -> EvaluationResult:
    """`evaluate` while it holds the output's lock, its tasks and instructions resolved; `folder` is the model's
    folder opened by `evaluate` (None for a Hub id)."""
    from ..encoding import embedding_width, load_encoder
    from .encoder import DiffEmbedEncoder, model_meta, mteb_identity
    from .local import STDLIB_ROWS

    suite, data, query_prompt, device = options.suite, options.data, options.query_prompt, options.device
    overwrite, calibration_rows, compaction = options.overwrite, options.calibration_rows, options.compaction()
    stdlib_rows, max_tokens_per_batch = options.stdlib_rows or STDLIB_ROWS, options.max_tokens_per_batch
    length = options.max_seq_length or SUITE_MAX_SEQ_LENGTH.get(suite or "")
    st_model = load_encoder(folder or model, device=device, max_seq_length=length,
                            trust_remote_code=options.trust_remote_code, truncate_dim=compaction.truncate_dim,
                            compile=options.compile)
    if identity is None:  # a Hub id: the commit just loaded
        identity = model_identity(model, getattr(st_model[0].auto_model.config, "_commit_hash", None))
        _check_same_model(earlier, identity, output, overwrite)
    width = embedding_width(st_model)
    compaction = dataclasses.replace(compaction, truncate_dim=st_model.truncate_dim)  # the stored one by default
    compaction.check(width, identity.as_dict())
    keep_earlier = earlier is not None and same_model(earlier.model, identity)
    query_prompts, prompt_sources = _query_prompts(task_list if data else [], suite, overrides, query_prompt,
                                                   st_model.prompts.get("query", ""))
    encoder_options = dict(instructions=overrides, query_prompts=query_prompts, prompt_sources=prompt_sources,
                           source=None if device else model, max_tokens_per_batch=max_tokens_per_batch)
    if compaction.is_identity:
        encoder = DiffEmbedEncoder(st_model, None, **encoder_options)
    else:
        from .compact_search import CompactEncoder

        encoder = CompactEncoder(st_model, None, compaction=compaction, model_identity=identity.as_dict(),
                                 calibration_rows=calibration_rows, **encoder_options)
    settings = {task.metadata.name: _task_settings(task, encoder, st_model.max_seq_length,
                                                   stdlib_rows if suite == "stdlib" else None, compaction,
                                                   calibration_rows)
                for task in task_list}
    name, revision = mteb_identity(identity)
    # mteb files each task's results under the model and that task's settings, so its cache never hands a task
    # the results of other settings
    metas = {task: model_meta(st_model, name, revision, {"max_seq_length": s["max_seq_length"],
                                                         "settings": settings_key(s)})
             for task, s in settings.items()}
    model_record = identity_record(identity)

    _prepare_partial(output, identity, overwrite)
    with staged_folder(output, resumable=True) as work:
        fresh = not any(work.iterdir())
        # names the model while the run is under way, so that only a rerun of the same model resumes this folder
        write_json(work / RunRecord.FILE, RunRecord(model, model_record).to_dict())
        _drop_unreadable(work)  # first, so that a seed copy cut short by a kill is made again
        if keep_earlier:
            _seed(work, output)
        seeded = set(work.rglob("*.json"))
        try:
            summary, record_tasks = _run(mteb, encoder, task_list, work, metas, overwrite=overwrite)
        except EvaluationError:
            if fresh and set(work.rglob("*.json")) == seeded:  # nothing of this run to resume: leave no trace
                shutil.rmtree(work, ignore_errors=True)
            raise
        stamp = {"mteb_version": mteb.__version__, "diffembed_hf_version": __version__,
                 "evaluated": time.strftime("%Y-%m-%d %H:%M:%S")}
        calibrations = getattr(encoder, "calibrations", None)
        results = _task_results(summary, record_tasks, settings, stamp, compaction.bytes_per_vector(width),
                                calibrations)
        all_results = merge_results(earlier.results if keep_earlier else [], results)
        record = RunRecord(
            model, model_record, finished=True, mteb_model_name=name, mteb_revision=revision, suite=suite,
            max_seq_length=st_model.max_seq_length, **stamp,
            vectors={"dim": compaction.output_dim(width), "bytes_per_vector": compaction.bytes_per_vector(width),
                     **compaction.describe(), "calibrations": calibrations or None},
            tasks=record_tasks).to_dict()
        write_json(work / SUMMARY, Summary(model_record, all_results).to_dict())
        write_json(work / RunRecord.FILE, record)
    table = format_table(all_results)
    logger.debug("Evaluation results in %s\n%s", output, table)  # the CLI prints the table once
    return EvaluationResult(output, summary, table, record, all_results)


def _task_settings(task, encoder, max_seq_length: int, stdlib_rows: int | None, compaction: Compaction,
                   calibration_rows: int) -> dict:
    """What, beside the model and the data, decides a task's scores (its results are kept per settings)."""
    from .local import STDLIB_TASK

    route = encoder.routing(task.metadata)
    settings = {"max_seq_length": max_seq_length, "query_prompt": route["query"], "document_prompt": route["document"]}
    if task.metadata.name == STDLIB_TASK and stdlib_rows is not None:
        settings["max_heldout"] = stdlib_rows
    if not compaction.is_identity:  # another result beside the float one (and another mteb cache folder)
        settings["compact"] = {**compaction.describe(), "calibration_rows": calibration_rows}
    return settings


def _task_results(summary: dict, record_tasks: dict, settings: dict, stamp: dict, bytes_per_vector: float,
                  calibrations: dict | None) -> list[dict]:
    """One summary.json entry per task: its scores, the settings that decided them, its data and prompts, and
    the ranges its corpus gave (int8/uint8)."""
    results = [{
        "task": task, "settings": settings[task], "settings_key": settings_key(settings[task]), "scores": scores,
        **{k: record_tasks[task][k] for k in ("type", "dataset", "dataset_revision", "splits", "subsets")},
        "prompts": record_tasks[task]["routing"], **stamp,
    } for task, scores in summary.items()]
    for result in results:
        result["scores"]["bytes_per_vector"] = bytes_per_vector
        if calibrations and result["task"] in calibrations:
            result["calibration"] = calibrations[result["task"]]
    return results


def _query_prompts(data_tasks: list, suite: str | None, overrides: dict[str, str], query_prompt: str | None,
                   model_query_prompt: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """A local task's query prompt, and (instruction, where it came from): the instruction file, else
    --query-prompt, else the model's own query prompt; one rule for both (`instruction_prompt`)."""
    from ..sentence_transformer import instruction_prompt
    from .local import STDLIB_TASK

    query_prompts, prompt_sources = {}, {}
    if suite == "stdlib":
        query_prompts[STDLIB_TASK] = ""  # the anchors already carry the task's instruction
        prompt_sources[STDLIB_TASK] = ("", "the task's queries carry their instruction")
    for task in data_tasks:
        name = task.metadata.name
        if name in overrides:
            query_prompts[name] = instruction_prompt(overrides[name])
            prompt_sources[name] = (overrides[name], "instruction file")
        elif query_prompt is not None:
            query_prompts[name] = instruction_prompt(query_prompt)
            prompt_sources[name] = (query_prompt, "--query-prompt")
        else:
            query_prompts[name] = model_query_prompt
            prompt_sources[name] = (model_query_prompt, "the model's query prompt")
    return query_prompts, prompt_sources


def _run(mteb, encoder, task_list: list, work: Path, metas: dict, *, overwrite: bool) -> tuple[dict, dict]:
    """mteb.evaluate task by task into the staging folder's result cache; (summary, the run record's tasks)."""
    cache = mteb.ResultCache(work)
    summary, record_tasks = {}, {}
    for task in task_list:
        task_name = task.metadata.name
        meta = encoder.mteb_model_meta = metas[task_name]  # mteb reads the model's identity and settings here
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
            "result_file": cache.get_task_result_path(task_name, meta).relative_to(work).as_posix(),
            "routing": encoder.routing(task.metadata),
            **({"prompts_sent": encoder.used[task_name]} if task_name in encoder.used else {}),
        }
    return summary, record_tasks


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

