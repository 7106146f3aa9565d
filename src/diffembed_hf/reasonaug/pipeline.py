"""The ReasonAug run: plan the requests from the concepts and the journal (planner), send them (client) or write
a batch file (batch), and when every request is answered write the dataset (dataset).

Requests go in waves (definitions and problems, then checks, then any re-asks) until the plan has nothing pending.
With a deterministic server two runs write the same bytes, killed or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import OptionError, OutputExistsError, UsageError, require_extra
from ..outputs import check_parent_writable, final_path, move_into_place, output_lock, temporary_sibling
from ..validation import (check_fraction, check_non_negative_int, check_positive_float, check_positive_int,
                          read_options, with_overrides)
from .concepts import ConceptSet, load_concepts
from .dataset import write_dataset
from .journal import JOURNAL, Journal, canonical_json
from .planner import Planner, Request, Settings
from .prompts import Prompts, load_prompts

if TYPE_CHECKING:
    from .batch import BatchResults

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
FORMAT = "diffembed-reasonaug/1"


@dataclass
class ReasonAugResult:
    """`status` is "complete" (the dataset is written) or "batch" (a batch input file waits to be run)."""

    status: str
    output: Path
    summary: dict
    traffic: dict
    batch_file: Path | None = None
    pending: int = 0


# ----------------------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------------------


def _identity(settings: Settings, prompts: Prompts, concepts: ConceptSet) -> str:
    return hashlib.sha256(canonical_json({"settings": asdict(settings), "prompts": prompts.data,
                                          "concepts": concepts.sha256}).encode()).hexdigest()


def _prepare_output(out: Path, identity: str, *, overwrite: bool) -> None:
    """A new or empty folder, a folder of this same run (resumed; a journal without run.json is a run killed as
    it started), or, with overwrite, any folder (a run of other settings keeps its journal: answers to identical
    requests are reused)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if (out / RUN_RECORD).is_file():
        if _read_record(out).get("identity") != identity and not overwrite:
            raise OutputExistsError(
                f"{out} holds a ReasonAug run with other settings, prompts or concepts; pass --overwrite to make this "
                "run's outputs there (answers to identical requests are reused from its journal), or give a new OUT")
    elif out.is_dir() and any(out.iterdir()) and not (out / JOURNAL).is_file() and not overwrite:
        raise OutputExistsError(f"{out} exists, is not empty and holds no ReasonAug run; pass --overwrite to write "
                                "into it")
    check_parent_writable(out)
    out.mkdir(parents=True, exist_ok=True)


def _read_record(out: Path) -> dict:
    try:
        return json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_run_record(out: Path, record: dict) -> None:
    tmp = temporary_sibling(out / RUN_RECORD, "partial")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    move_into_place(tmp, out / RUN_RECORD)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReasonAugOptions:
    """How `generate_reasonaug` asks the server: the model and its sampling (which, with the prompts and the
    concepts, decide the data), the traffic, and the Batch API files, checked once, here. Load them from JSON
    with `from_file`."""

    model: str  # the model name the server serves
    base_url: str | None = None  # None: OPENAI_BASE_URL, else OpenAI's
    api_key: str | None = field(default=None, repr=False)  # None: OPENAI_API_KEY; never shown
    prompts: str | Path | Prompts | None = None  # None: the study's prompts
    problems_per_concept: int = 8
    seed: int = 0
    temperature: float = 1.0
    max_tokens: int = 4000
    answer_retries: int = 1  # re-asks of an unusable answer
    heldout_fraction: float = 0.1  # of each domain's concepts, held out for evaluation
    max_pairs: int = 20
    workers: int = 8  # requests in flight at a time
    timeout: float = 300.0  # seconds per request
    max_retries: int = 5  # of a request that failed in a way a later try can fix
    retry_delay: float = 1.0  # seconds before the first retry (doubling after)
    batch_file: str | Path | None = None  # write the pending requests there (Batch API input) instead of sending
    from_batch_output: str | Path | None = None  # journal a batch's results first
    overwrite: bool = False
    show_progress: bool | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise OptionError("model", "is required: the model name the server serves")
        for name in ("problems_per_concept", "max_tokens", "max_pairs", "workers"):
            check_positive_int(name, getattr(self, name))
        for name in ("seed", "answer_retries", "max_retries"):
            check_non_negative_int(name, getattr(self, name))
        check_fraction("heldout_fraction", self.heldout_fraction)
        check_positive_float("timeout", self.timeout)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 2:
            raise OptionError("temperature", f"must be a number in [0, 2], got {self.temperature!r}")
        if isinstance(self.retry_delay, bool) or not isinstance(self.retry_delay, (int, float)) \
                or not 0 <= self.retry_delay < float("inf"):
            raise OptionError("retry_delay", f"must be a number >= 0, got {self.retry_delay!r}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> ReasonAugOptions:
        """The options a JSON file of field values sets, `overrides` winning; unknown keys are an error."""
        return read_options(cls, path, "reasonaug", **overrides)


def generate_reasonaug(concepts: str | Path | ConceptSet, out: str | Path, options: ReasonAugOptions | None = None,
                       **overrides) -> ReasonAugResult:
    """Make ReasonAug training data for the concepts through an OpenAI-compatible chat server (or the Batch API),
    resumably: OUT/journal.jsonl keeps every answer, and a rerun of the same command sends only what is missing.
    `options` is a `ReasonAugOptions`; its fields may also be given as keywords (`model="..."`), over `options`.

    Writes, once every request is answered: OUT/train.jsonl (rows `diffembed train` reads as they are),
    OUT/corpus.jsonl (every concept's definition), OUT/heldout/ (a BEIR folder of held-out concepts for
    `diffembed evaluate --data`), OUT/dropped.jsonl (each definition, problem or check that never made it, and
    why; an unusable answer that a re-ask replaced is only counted, in run.json's summary.unusable_answers) and
    OUT/run.json (prompts, model, sampling settings, package version, counts). With `batch_file`, the pending
    requests are written there as a Batch API input file instead of being sent; `from_batch_output` journals a
    batch's results first.
    """
    require_extra("reasonaug")
    if options is None and "model" not in overrides:
        raise OptionError("model", "is required: the model name the server serves")
    o = with_overrides(ReasonAugOptions, options, overrides)
    model, batch_file, from_batch_output, overwrite = o.model, o.batch_file, o.from_batch_output, o.overwrite
    concept_set = concepts if isinstance(concepts, ConceptSet) else load_concepts(concepts)
    prompt_set = o.prompts if isinstance(o.prompts, Prompts) else load_prompts(o.prompts)
    settings = Settings(model=model, problems_per_concept=o.problems_per_concept, seed=o.seed,
                        temperature=o.temperature, max_tokens=o.max_tokens, answer_retries=o.answer_retries,
                        heldout_fraction=o.heldout_fraction, max_pairs=o.max_pairs)
    out = final_path(Path(out))  # a link the user made for OUT is followed, even to a folder not made yet
    base_url = o.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = o.api_key or os.environ.get("OPENAI_API_KEY") or None
    if batch_file is None and from_batch_output is None:  # a live run: its key is checked before any work
        api_key = _api_key(base_url, api_key)
    if batch_file is not None and Path(batch_file).exists() and not overwrite:
        raise OutputExistsError(f"--batch-file {batch_file} exists; pass --overwrite to replace it")
    batch_results = None
    if from_batch_output is not None:  # a batch output file that cannot be read is refused before OUT is touched
        from .batch import read_batch_output

        batch_results = read_batch_output(Path(from_batch_output))
    identity = _identity(settings, prompt_set, concept_set)
    check_parent_writable(out)
    with output_lock(out):  # first: only a check made under the lock holds while this run writes
        _prepare_output(out, identity, overwrite=overwrite)
        return _generate(out, identity, concept_set, prompt_set, settings, model=model, base_url=base_url,
                         api_key=api_key, workers=o.workers, timeout=o.timeout, max_retries=o.max_retries,
                         retry_delay=o.retry_delay, batch_file=batch_file, from_batch_output=from_batch_output,
                         batch_results=batch_results, overwrite=overwrite, show_progress=o.show_progress)


def _generate(out: Path, identity: str, concept_set: ConceptSet, prompt_set: Prompts, settings: Settings, *,
              model: str, base_url: str | None, api_key: str | None, workers: int, timeout: float, max_retries: int,
              retry_delay: float, batch_file: str | Path | None, from_batch_output: str | Path | None,
              batch_results, overwrite: bool, show_progress: bool | None) -> ReasonAugResult:
    """`generate_reasonaug` while it holds OUT's lock (OUT already checked); `batch_results` is the batch output
    already read (None without one)."""
    planner = Planner(concept_set, prompt_set, settings)
    record = {"format": FORMAT, "diffembed_hf_version": __version__, "identity": identity, "complete": False,
              "model": model, "base_url": base_url, "settings": asdict(settings),
              "concepts": {"file": concept_set.source, "sha256": concept_set.sha256}, "prompts": prompt_set.data}
    traffic = {"sent": 0, "replayed": 0, "prompt_tokens": 0, "completion_tokens": 0, "retried": {}, "failed": {},
               "batch_lines_journaled": 0, "batch_lines_failed": {}, "batch_lines_unknown": 0}
    client = None
    with Journal(out) as journal:
        if journal.torn_line:
            logger.info("The journal's last line was torn by an interrupted run and was dropped.")
        if not (out / RUN_RECORD).is_file():  # a run of other settings (--overwrite) keeps its record until the end,
            _write_run_record(out, record)     # when its outputs are replaced: the folder never mixes two runs
        if batch_results is not None:
            _ingest_batch(Path(from_batch_output), batch_results, planner, journal, traffic)
        while True:
            plan = planner.plan(journal.answers)
            if not plan.pending:
                break
            if batch_file is not None:
                from .batch import write_batch_input

                write_batch_input(Path(batch_file), plan.pending, overwrite=overwrite)
                traffic["replayed"] = len(plan.used) - traffic["batch_lines_journaled"]
                return ReasonAugResult("batch", out, {}, traffic, Path(batch_file), len(plan.pending))
            if client is None:
                from .client import ChatClient

                client = ChatClient(base_url, _api_key(base_url, api_key), timeout=timeout, max_retries=max_retries,
                                    workers=workers, retry_delay=retry_delay)
                client.check_server(model)
            _send(client, plan.pending, journal, show_progress)
    if client is not None:
        t = client.traffic
        traffic.update(sent=t.answered, prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
                       retried=dict(t.retried), failed=dict(t.failed))
    traffic["replayed"] = len(plan.used) - traffic["sent"] - traffic["batch_lines_journaled"]
    summary = write_dataset(out, planner, plan, journal.answers)
    record.update(complete=True, summary=summary, base_url=base_url)
    _write_run_record(out, record)
    return ReasonAugResult("complete", out, summary, traffic)


def _api_key(base_url: str | None, api_key: str | None) -> str:
    if api_key is not None:
        return api_key
    if base_url is None:
        raise UsageError("OPENAI_API_KEY is not set: the hosted API needs it (or give --base-url of a local "
                         "server, or --batch-file to write the requests instead)")
    return "EMPTY"  # a local server (vLLM without --api-key) takes any key; the client needs one


def _send(client, pending: list[Request], journal: Journal, show_progress: bool | None) -> None:
    from tqdm.auto import tqdm

    from .client import RequestFailed, ServerError

    stages = ", ".join(dict.fromkeys(f"{r.stage}s" for r in pending))
    by_key = {r.key: r for r in pending}
    disable = not (sys.stderr.isatty() if show_progress is None else show_progress)
    with tqdm(total=len(pending), desc=stages, unit="req", disable=disable, dynamic_ncols=True) as bar:
        def on_answer(key: str, answer: dict) -> None:
            request = by_key[key]
            journal.append({"key": key, "stage": request.stage, "item": request.item, "body": request.body,
                            "answer": answer})
            bar.update(1)
            bar.set_postfix_str(f"{client.traffic.prompt_tokens:,} in + {client.traffic.completion_tokens:,} out "
                                f"tokens, {sum(client.traffic.retried.values())} retried", refresh=False)

        try:
            client.run([(r.key, r.body) for r in pending], on_answer)
        except RequestFailed as err:
            # counted from the journal, not the bar: a disabled bar (stderr not a terminal: logs, CI) counts nothing
            arrived = sum(request.key in journal.answers for request in pending)
            raise ServerError(f"a request failed after {client.max_retries} retries ({err}); the {arrived} answers "
                              f"that arrived are in {journal.path}: run the same command again to send the other "
                              f"{len(pending) - arrived}") from None


def _ingest_batch(path: Path, results: BatchResults, planner: Planner, journal: Journal, traffic: dict) -> None:
    """Journal the answers of a batch output file (`results`, read from `path`) to the requests this run has
    pending (in plan order)."""
    traffic["batch_lines_failed"] = dict(results.failed)
    while True:  # an answer can make the next wave's requests pending (a re-ask in the same file is not possible)
        plan = planner.plan(journal.answers)
        matched = [r for r in plan.pending if r.key in results.answers]
        if not matched:
            break
        for request in matched:
            answer = results.answers.pop(request.key)
            journal.append({"key": request.key, "stage": request.stage, "item": request.item, "body": request.body,
                            "answer": answer})
            traffic["batch_lines_journaled"] += 1
    unknown = [key for key in results.answers if key not in journal.answers]
    traffic["batch_lines_unknown"] = len(unknown)
    if unknown and not traffic["batch_lines_journaled"]:
        raise UsageError(f"--from-batch-output {path}: none of its {len(unknown)} answers is to a request of this run "
                         "(was the batch made for another OUT, or other settings or prompts?)")
    if unknown:
        logger.warning("%s: %d answers are to no pending request of this run and were ignored", path, len(unknown))
