"""The ReasonAug run: plan the requests from the concepts and the journal, send them (or write a batch file),
and when every request is answered write the dataset.

The plan is a pure function of (concepts, prompts, settings, journal): for each concept a definition request, and
`problems_per_concept` problem requests; for each usable problem a checker request. An unusable answer (empty,
refused, cut off, without its sections, or a problem that names its concept) is asked again with a new sampling
seed, up to `answer_retries` times, then dropped. Requests go in waves (definitions and problems, then checks, then
any re-asks) until the plan has nothing pending. Every request's sampling seed, every topic and reference, the
held-out concepts and every row choice come from `seed`, so that with a deterministic server two runs write the
same bytes, killed or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import DiffembedError, OutputExistsError, UsageError, require_extra
from ..files import check_parent_writable, move_into_place, temporary_sibling
from .answers import RETRYABLE, parse_definition, parse_problem
from .checker import verdict
from .concepts import ConceptSet, Domain, load_concepts
from .journal import JOURNAL, Journal, canonical_json, request_key
from .prompts import STAGES, Prompts, load_prompts
from .rows import ConceptData, RowBuilder

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
FORMAT = "diffembed-reasonaug/1"
RETRYABLE_CHECK = RETRYABLE - {"missing_sections", "names_concept"}  # a checker answer is a verdict or nothing


@dataclass(frozen=True)
class Settings:
    """What decides the requests and the rows (a run's identity, with the prompts and the concepts)."""

    model: str
    problems_per_concept: int = 8
    seed: int = 0
    temperature: float = 1.0
    check_temperature: float = 0.0
    max_tokens: int = 4000
    answer_retries: int = 1
    heldout_fraction: float = 0.1
    max_pairs: int = 20
    p2i_negatives: int = 2


@dataclass(frozen=True)
class Request:
    key: str
    stage: str
    item: str  # for people reading the journal: "problem | algorithm | Binary Search | #3 | try 0"
    body: dict


def _seed(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 2**31


def _norm_text(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass
class Plan:
    """What the journal's answers make of the concepts: the requests still to send, and everything usable."""

    pending: list[Request] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=dict)
    pairs: dict[str, list[tuple[int, str, str]]] = field(default_factory=lambda: defaultdict(list))
    unusable: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # every unusable answer
    dropped: list[dict] = field(default_factory=list)  # what never made it, and why
    used: set[str] = field(default_factory=set)  # journal keys this run reads

    def drop(self, stage: str, domain: Domain, concept: str, index: int | None, reason: str, content=None) -> None:
        self.dropped.append({"stage": stage, "domain": domain.name, "concept": concept, "index": index,
                             "reason": reason, "answer": content})


class Planner:
    def __init__(self, concepts: ConceptSet, prompts: Prompts, settings: Settings):
        self.concepts, self.prompts, self.settings = concepts, prompts, settings

    def request(self, stage: str, domain: Domain, concept: str, index: int | None, attempt: int, messages,
                temperature: float) -> Request:
        s = self.settings
        body = {**self.prompts.request_fields(stage), "model": s.model, "messages": messages,
                "temperature": temperature, "max_completion_tokens": s.max_tokens,
                "seed": _seed(s.seed, stage, domain.name, concept, index, attempt)}
        item = " | ".join([stage, domain.name, concept] + ([f"#{index}"] if index is not None else [])
                          + [f"try {attempt}"])
        return Request(request_key(body), stage, item, body)

    def problem_messages(self, domain: Domain, concept: str, index: int):
        rng = random.Random(_seed(self.settings.seed, "topic", domain.name, concept, index))
        topic, reference = rng.choice(self.prompts.topics(domain)), rng.choice(self.prompts.references(domain))
        return self.prompts.messages("problem", domain, concept=concept, topic=topic, reference=reference)

    def _ask(self, plan: Plan, answers: dict, make, parse, retryable: set, on_drop) -> tuple[str, ...] | None:
        """Walk one request's attempts: the parsed sections of the first usable answer, or None (pending or
        dropped: `on_drop(reason, content)`)."""
        for attempt in range(self.settings.answer_retries + 1):
            request = make(attempt)
            record = answers.get(request.key)
            if record is None:
                plan.pending.append(request)
                return None
            plan.used.add(request.key)
            parsed = parse(record["answer"])
            if parsed.failure is None:
                return parsed.sections
            plan.unusable[request.stage][parsed.failure] += 1
            if parsed.failure not in retryable or attempt == self.settings.answer_retries:
                on_drop(parsed.failure, record["answer"].get("content"))
                return None
        return None

    def plan(self, answers: dict) -> Plan:
        plan, s = Plan(), self.settings
        for domain, concept in self.concepts.concepts:
            messages = self.prompts.messages("definition", domain, concept=concept)
            sections = self._ask(
                plan, answers,
                lambda attempt: self.request("definition", domain, concept, None, attempt, messages, s.temperature),
                parse_definition, RETRYABLE,
                lambda reason, content: plan.drop("definition", domain, concept, None, reason, content))
            if sections:
                plan.definitions[concept] = sections[0]
            for index in range(1, s.problems_per_concept + 1):
                messages = self.problem_messages(domain, concept, index)
                pair = self._ask(
                    plan, answers,
                    lambda attempt: self.request("problem", domain, concept, index, attempt, messages, s.temperature),
                    lambda answer: parse_problem(answer, concept), RETRYABLE,
                    lambda reason, content: plan.drop("problem", domain, concept, index, reason, content))
                if not pair:
                    continue
                check_messages = self.prompts.messages("check", domain, concept=concept, problem=pair[0],
                                                       solution=pair[1])
                checked = self._ask(
                    plan, answers,
                    lambda attempt: self.request("check", domain, concept, index, attempt, check_messages,
                                                 s.check_temperature),
                    lambda answer: verdict(answer, coding=domain.coding, solution=pair[1]), RETRYABLE_CHECK,
                    lambda reason, content: plan.drop("check", domain, concept, index, reason, content))
                if checked:
                    plan.pairs[concept].append((index, pair[0], checked[0]))
        return plan

    def heldout(self) -> list[str]:
        """The held-out concepts: per domain, `heldout_fraction` of its concepts (at least two stay for training);
        if that holds none out anywhere, one concept of the first domain with three or more."""
        fraction, chosen = self.settings.heldout_fraction, []
        for domain in self.concepts:
            count = min(int(fraction * len(domain.concepts) + 1e-9), max(len(domain.concepts) - 2, 0))
            rng = random.Random(_seed(self.settings.seed, "heldout", domain.name))
            chosen += rng.sample(list(domain.concepts), count)
        if fraction > 0 and not chosen:
            for domain in self.concepts:
                if len(domain.concepts) >= 3:
                    rng = random.Random(_seed(self.settings.seed, "heldout", domain.name))
                    chosen.append(rng.choice(domain.concepts))
                    break
        return chosen


def format_query(query: str, instruction: str) -> str:
    """Instruction + query as `diffembed train` builds its anchors (data.format_query): "instruction:\\n" + query."""
    return instruction.strip().rstrip(":") + ":\n" + query


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


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _publish_file(path: Path, text: str) -> None:
    tmp = temporary_sibling(path, "partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish_folder(path: Path, files: dict[str, str]) -> None:
    tmp = temporary_sibling(path)
    try:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        move_into_place(tmp, path)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HELDOUT_README = """# Held-out ReasonAug concepts (BEIR layout)

Queries: the checked problems of concepts that are not in train.jsonl, each with its p2i instruction already in
front (as `diffembed train` puts it on its anchors). Corpus: the definitions of every concept. Relevant: each
problem's own concept. Evaluate with the instruction already in the queries:

    diffembed evaluate MODEL --data {folder} --query-prompt '' --output MODEL/eval
"""


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def generate_reasonaug(
    concepts: str | Path | ConceptSet,
    out: str | Path,
    *,
    model: str,
    base_url: str | None = None,
    api_key: str | None = None,
    problems_per_concept: int = 8,
    workers: int = 8,
    seed: int = 0,
    prompts: str | Path | Prompts | None = None,
    temperature: float = 1.0,
    max_tokens: int = 4000,
    answer_retries: int = 1,
    heldout_fraction: float = 0.1,
    max_pairs: int = 20,
    timeout: float = 300.0,
    max_retries: int = 5,
    retry_delay: float = 1.0,
    batch_file: str | Path | None = None,
    from_batch_output: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool | None = None,
) -> ReasonAugResult:
    """Make ReasonAug training data for the concepts through an OpenAI-compatible chat server (or the Batch API),
    resumably: OUT/journal.jsonl keeps every answer, and a rerun of the same command sends only what is missing.

    Writes, once every request is answered: OUT/train.jsonl (rows `diffembed train` reads as they are),
    OUT/corpus.jsonl (every concept's definition), OUT/heldout/ (a BEIR folder of held-out concepts for
    `diffembed evaluate --data`), OUT/dropped.jsonl (every unusable answer and why) and OUT/run.json (prompts,
    model, sampling settings, package version, counts). With `batch_file`, the pending requests are written there
    as a Batch API input file instead of being sent; `from_batch_output` journals a batch's results first.
    """
    require_extra("reasonaug")
    concept_set = concepts if isinstance(concepts, ConceptSet) else load_concepts(concepts)
    prompt_set = prompts if isinstance(prompts, Prompts) else load_prompts(prompts)
    if not model or not model.strip():
        raise UsageError("--model is required: the model name the server serves")
    settings = Settings(model=model, problems_per_concept=problems_per_concept, seed=seed, temperature=temperature,
                        max_tokens=max_tokens, answer_retries=answer_retries, heldout_fraction=heldout_fraction,
                        max_pairs=max_pairs)
    out = Path(out)
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
    if batch_file is None and from_batch_output is None:  # a live run: its key is checked before any work
        api_key = _api_key(base_url, api_key)
    if batch_file is not None and Path(batch_file).exists() and not overwrite:
        raise OutputExistsError(f"--batch-file {batch_file} exists; pass --overwrite to replace it")
    identity = _identity(settings, prompt_set, concept_set)
    _prepare_output(out, identity, overwrite=overwrite)
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
        if from_batch_output is not None:
            _ingest_batch(Path(from_batch_output), planner, journal, traffic)
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
    summary = _write_dataset(out, planner, plan, journal.answers)
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
            raise ServerError(f"a request failed after {client.max_retries} retries ({err}); the {bar.n} answers "
                              f"that arrived are in {journal.path}: run the same command again to send the other "
                              f"{len(pending) - bar.n}") from None


def _ingest_batch(path: Path, planner: Planner, journal: Journal, traffic: dict) -> None:
    """Journal the answers of a batch output file to the requests this run has pending (in plan order)."""
    from .batch import read_batch_output

    results = read_batch_output(path)
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


def _write_dataset(out: Path, planner: Planner, plan: Plan, answers: dict) -> dict:
    """train.jsonl, corpus.jsonl, dropped.jsonl and heldout/, each written whole; returns the dataset's counts."""
    settings, prompts = planner.settings, planner.prompts
    heldout = set(planner.heldout())
    # duplicates: the same problem text (spacing and case aside) is kept once, first in file order
    seen: set[str] = set()
    items, held_items = [], []
    for domain in planner.concepts:
        for concept in domain.concepts:
            pairs = []
            for index, problem, solution in plan.pairs.get(concept, []):
                key = _norm_text(problem)
                if key in seen:
                    plan.drop("problem", domain, concept, index, "duplicate", problem)
                    continue
                seen.add(key)
                pairs.append((problem, solution))
            item = ConceptData(domain, concept, plan.definitions.get(concept), tuple(pairs))
            (held_items if concept in heldout else items).append(item)
    builder = RowBuilder(items, prompts, seed=settings.seed, max_pairs=settings.max_pairs,
                         p2i_negatives=settings.p2i_negatives)
    rows = builder.build()
    if not rows:
        _write_dropped(out, plan)
        raise DiffembedError(
            f"no training rows: of {len(planner.concepts.concepts)} concepts, {len(plan.definitions)} have a usable "
            f"definition and {sum(len(i.pairs) for i in items)} checked problems remain for the training concepts; "
            f"see {out / 'dropped.jsonl'} for what was dropped and why")
    corpus, doc_of = [], {}
    for domain in planner.concepts:
        for concept in domain.concepts:
            if concept in plan.definitions:
                doc_of[concept] = f"d{len(corpus) + 1}"
                corpus.append({"_id": doc_of[concept], "title": concept, "text": plan.definitions[concept],
                               "domain": domain.name})
    queries, qrels = [], []
    for item in held_items:
        if item.name not in doc_of:
            continue
        instruction = prompts.instruction("p2i", item.domain)
        for problem, _ in item.pairs:
            query_id = f"q{len(queries) + 1}"
            queries.append({"_id": query_id, "text": format_query(problem, instruction), "domain": item.domain.name,
                            "concept": item.name})
            qrels.append(f"{query_id}\t{doc_of[item.name]}\t1\n")
    _publish_file(out / "train.jsonl", _jsonl(rows))
    _publish_file(out / "corpus.jsonl", _jsonl(corpus))
    _write_dropped(out, plan)
    if queries:
        _publish_folder(out / "heldout", {
            "corpus.jsonl": _jsonl([{"_id": d["_id"], "title": d["title"], "text": d["text"]} for d in corpus]),
            "queries.jsonl": _jsonl(queries),
            "qrels/test.tsv": "query-id\tcorpus-id\tscore\n" + "".join(qrels),
            "README.md": _HELDOUT_README.format(folder=out / "heldout"),
        })
    else:
        logger.warning("No held-out folder: %s", "no concept is held out (--heldout-fraction 0, or too few concepts)"
                       if not heldout else "no held-out concept kept a definition and a checked problem")
    dropped = defaultdict(Counter)
    for entry in plan.dropped:
        dropped[entry["stage"]][entry["reason"]] += 1
    journaled = [answers[key] for key in sorted(plan.used)]
    return {
        "concepts": len(planner.concepts.concepts), "domains": len(planner.concepts.domains),
        "heldout_concepts": sorted(heldout),
        "requests": {"answered": len(journaled), "by_stage": {stage: count for stage in STAGES if (count := sum(
                         r["stage"] == stage for r in journaled))},
                     "prompt_tokens": _tokens(journaled, "prompt_tokens"),
                     "completion_tokens": _tokens(journaled, "completion_tokens")},
        "unusable_answers": {stage: dict(counts) for stage, counts in plan.unusable.items()},
        "dropped": {stage: dict(counts) for stage, counts in dropped.items()},
        "definitions": len(plan.definitions),
        "problems": {"asked": len(planner.concepts.concepts) * settings.problems_per_concept,
                     "checked": sum(len(p) for p in plan.pairs.values()),
                     "kept": sum(len(i.pairs) for i in items + held_items)},
        "rows": {"total": len(rows), **dict(sorted(Counter(r["task_type"] for r in rows).items()))},
        "rows_without_negative": dict(builder.no_negative),
        "heldout": {"queries": len(queries), "documents": len(corpus) if queries else 0},
    }


def _tokens(records: list[dict], kind: str) -> int:
    """The tokens the server reported (usage) over journal records; a server that reports none counts 0."""
    return sum((record["answer"].get("usage") or {}).get(kind) or 0 for record in records)


def _write_dropped(out: Path, plan: Plan) -> None:
    _publish_file(out / "dropped.jsonl", _jsonl(plan.dropped))
