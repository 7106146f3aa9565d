"""Local retrieval sets as mteb retrieval tasks: a BEIR-layout folder, or the built-in standard-library task.

BEIR layout: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`, and optionally BRIGHT's
`excluded_ids`: documents never ranked for that query), `qrels/test.tsv` with the header
`query-id corpus-id score`; each may be compressed (`corpus.jsonl.gz`, as the BEIR downloads are). The files are
read by `diffembed_hf.readers`, as `diffembed encode` reads them. Every problem names the file and line. A
(query, document) pair listed twice with the same score counts once; with two scores it is refused, naming both
lines. Queries without qrels are named in one warning: mteb leaves them out of the scores. mteb's own retrieval
evaluation scores the rest (pytrec_eval); excluded ids become mteb's `top_ranked` (every document but the
excluded), as for BRIGHT v1.1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from datasets import Dataset
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata

from ..errors import EvaluationError
from ..readers import COMPRESSIONS, check_id, check_text, lines_at, read_records

logger = logging.getLogger(__name__)

BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
QRELS_SCORES = (-2**31, 2**31 - 1)  # what pytrec_eval, which scores the runs, can hold (a C int)
STDLIB_TASK = "StdlibHeldOutRetrieval"
STDLIB_ROWS = 300  # the demo's default --max-heldout


class LocalRetrievalTask(AbsTaskRetrieval):
    """An mteb retrieval task over data already in memory (split 'test'); made by `local_task`, which gives each
    task its own subclass because mteb reads `metadata` from the class."""

    metadata: TaskMetadata

    def __init__(self, data: tuple):
        super().__init__()
        self._data = data

    def load_data(self, **kwargs) -> None:
        if self.data_loaded:
            return
        corpus, queries, qrels, excluded = self._data
        self.corpus = {"test": Dataset.from_list(
            [{"id": i, "title": d.get("title", ""), "text": d["text"]} for i, d in corpus.items()])}
        self.queries = {"test": Dataset.from_list([{"id": i, "text": t} for i, t in queries.items()])}
        self.relevant_docs = {"test": {q: dict(docs) for q, docs in qrels.items()}}
        if excluded:
            ids = list(corpus)
            self.top_ranked = {"test": {q: [i for i in ids if i not in excluded.get(q, ())] for q in queries}}
        self.data_loaded = True


def local_task(name: str, corpus: dict[str, dict[str, str]], queries: dict[str, str],
               qrels: dict[str, dict[str, int]], *, excluded: dict[str, set[str]] | None = None, source: str = "",
               revision: str = "", description: str = "A local retrieval set.") -> LocalRetrievalTask:
    metadata = TaskMetadata(
        name=name, description=description, dataset={"path": source or name, "revision": revision or "local"},
        type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["und-Zyyy"],
        main_score="ndcg_at_10", reference=None, date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="",
    )
    task_class = type(re.sub(r"\W", "_", name), (LocalRetrievalTask,), {"metadata": metadata})
    return task_class((corpus, queries, qrels, excluded or {}))


def _beir_file(folder: Path, name: str) -> Path:
    """`name` in `folder`, or its one compressed form (`corpus.jsonl.gz`, ...)."""
    found = [folder / (name + suffix) for suffix in ("", *COMPRESSIONS) if (folder / (name + suffix)).is_file()]
    if not found:
        raise EvaluationError(f"{folder / name}: missing (a BEIR folder holds {', '.join(BEIR_FILES)}, each "
                              "optionally .gz / .bz2 / .xz)")
    if len(found) > 1:
        raise EvaluationError(f"{folder}: both {found[0].name} and {found[1].name}; keep one")
    return found[0]


def _jsonl(path: Path) -> list[tuple[str, str, dict]]:
    """(where, _id, record) per record; `text` a string, `_id` a string or integer, each id once."""
    records, seen = [], {}
    for record in read_records(path, error=EvaluationError):
        data = record.data
        problem = record.problem
        if problem is None:
            identifier, problem = check_id(data.get("_id"), "id field '_id'")
        if problem is None:
            problem = check_text(data.get("text"), "text field 'text'")
        if problem is None and identifier in seen:
            problem = f"duplicate _id {identifier!r} (also {seen[identifier]})"
        if problem is not None:
            raise EvaluationError(f"{record.where}: {problem}")
        seen[identifier] = record.where
        records.append((record.where, identifier, data))
    if not records:
        raise EvaluationError(f"{path}: no records")
    return records


def _qrels(path: Path, queries: dict, corpus: dict) -> dict[str, dict[str, int]]:
    """The relevance judgements; a pair given twice must have one score (it then counts once)."""
    qrels: dict[str, dict[str, int]] = {}
    first: dict[tuple[str, str], int] = {}  # (query, document) -> the line that gave it
    repeated = 0
    lines = lines_at(path, error=EvaluationError)
    for line in lines:
        where = line.where(path)
        if line.problem:
            raise EvaluationError(f"{where}: {line.problem}")
        if line.number == 1:
            header = line.text.split("\t")
            if header != ["query-id", "corpus-id", "score"]:
                raise EvaluationError(f"{where}: the header must be 'query-id<TAB>corpus-id<TAB>score', got {header}")
            continue
        if not line.text.strip():
            continue
        fields = line.text.split("\t")
        if len(fields) != 3:
            raise EvaluationError(f"{where}: expected 3 tab-separated fields, got {len(fields)}")
        query_id, doc_id, score = fields
        if query_id not in queries:
            raise EvaluationError(f"{where}: query-id {query_id!r} is not in queries.jsonl")
        if doc_id not in corpus:
            raise EvaluationError(f"{where}: corpus-id {doc_id!r} is not in corpus.jsonl")
        try:
            value = int(score)
        except ValueError:
            raise EvaluationError(f"{where}: score {score!r} is not an integer") from None
        if not QRELS_SCORES[0] <= value <= QRELS_SCORES[1]:  # pytrec_eval holds a score in a C int
            raise EvaluationError(f"{where}: score {score} is out of range; a relevance score is a whole number from "
                                  f"{QRELS_SCORES[0]} to {QRELS_SCORES[1]}")
        docs = qrels.setdefault(query_id, {})
        if doc_id in docs:
            if docs[doc_id] != value:
                raise EvaluationError(f"{path} lines {first[query_id, doc_id]} and {line.number}: query-id "
                                      f"{query_id!r} and corpus-id {doc_id!r} twice, with scores {docs[doc_id]} "
                                      f"and {value}; keep one")
            repeated += 1
            continue
        docs[doc_id] = value
        first[query_id, doc_id] = line.number
    if repeated:
        logger.warning("%s: %d lines repeat an earlier (query-id, corpus-id, score) line and count once", path,
                       repeated)
    return qrels


def _task_name(folder: Path) -> str:
    return "Local" + (re.sub(r"[^A-Za-z0-9_-]+", "_", folder.resolve().name) or "Data")


def beir_task(folder: str | Path, name: str | None = None) -> LocalRetrievalTask:
    """Read and check a BEIR-layout folder; the task name defaults to 'Local<folder name>'."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"--data {folder} is a file; give a BEIR folder" if folder.exists() else
                              f"--data {folder}: no such folder")
    files = [_beir_file(folder, rel) for rel in BEIR_FILES]
    corpus = {}
    for where, identifier, record in _jsonl(files[0]):
        title = record.get("title")
        problem = None if title is None else check_text(title, "title field 'title'")
        if problem:
            raise EvaluationError(f"{where}: {problem}")
        corpus[identifier] = {"title": title or "", "text": record["text"]}
    queries, excluded = {}, {}
    for where, identifier, record in _jsonl(files[1]):
        queries[identifier] = record["text"]
        ids = record.get("excluded_ids") or []
        if ids and ids != ["N/A"]:  # BRIGHT's marker for "none"
            unknown = [str(i) for i in ids if str(i) not in corpus]
            if unknown:
                raise EvaluationError(f"{where}: excluded_ids name documents not in {files[0].name}: {unknown[:5]}")
            excluded[identifier] = {str(i) for i in ids}
    qrels = _qrels(files[2], queries, corpus)
    if not any(score > 0 for docs in qrels.values() for score in docs.values()):
        raise EvaluationError(f"{files[2]}: no relevant (score > 0) pair")
    unjudged = [q for q in queries if q not in qrels]
    if unjudged:
        logger.warning("%s: %d of %d queries have no qrels in %s and are left out of the scores (as mteb leaves "
                       "them out): %s", files[1], len(unjudged), len(queries), files[2].relative_to(folder),
                       ", ".join(map(repr, unjudged[:5])) + (" ..." if len(unjudged) > 5 else ""))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()[:20]
    return local_task(name or _task_name(folder), corpus, queries, qrels, excluded=excluded,
                      source=str(folder.resolve()), revision=digest,
                      description=f"Local BEIR-layout retrieval set {folder.resolve()}.")


def stdlib_task(rows: int = STDLIB_ROWS) -> LocalRetrievalTask:
    """The demo's held-out task, exactly as `diffembed demo` scores it: the first `rows` held-out rows of the
    standard-library task (`builtin_task`), turned into queries / corpus / qrels by the training-time
    evaluator's own `retrieval_task`, queries = the anchors, which already carry their instruction (so the
    query prompt is '' here), documents bare; the caller evaluates at the demo's max_seq_length (128)."""
    from ..builtin_task import HELD_OUT_MODULES, build_rows
    from ..training_data import resolve_columns, to_training_rows
    from ..heldout import retrieval_task

    raw = Dataset.from_list(build_rows(HELD_OUT_MODULES)[:rows])
    columns, _ = to_training_rows(raw, "stdlib", resolve_columns(raw, "stdlib"))
    queries, corpus, relevant = retrieval_task(Dataset.from_dict(columns))
    digest = hashlib.sha256(json.dumps([queries, corpus], sort_keys=True).encode()).hexdigest()[:20]
    return local_task(
        STDLIB_TASK, {i: {"title": "", "text": t} for i, t in corpus.items()}, queries,
        {q: dict.fromkeys(docs, 1) for q, docs in relevant.items()}, source="diffembed-hf/stdlib-heldout",
        revision=digest, description="Python standard-library docstring summary -> function source (held-out "
        "modules), the task `diffembed demo` evaluates.")
