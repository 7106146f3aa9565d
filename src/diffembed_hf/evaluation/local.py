"""Local retrieval sets as mteb retrieval tasks: a BEIR-layout folder, or the built-in standard-library task.

BEIR layout: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`, and optionally BRIGHT's
`excluded_ids`: documents never ranked for that query), `qrels/test.tsv` with the header
`query-id corpus-id score`. Every problem names the file and line. mteb's own retrieval evaluation scores them
(pytrec_eval); excluded ids become mteb's `top_ranked` (every document but the excluded), as for BRIGHT v1.1.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from datasets import Dataset
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata

from ..errors import EvaluationError

BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")
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


def _jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    records, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{path} line {number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise EvaluationError(f"{path} line {number}: expected a JSON object")
            for key in required:
                if key not in record:
                    raise EvaluationError(f"{path} line {number}: no {key!r} field")
            record["_id"] = str(record["_id"])
            if not isinstance(record["text"], str):
                raise EvaluationError(f"{path} line {number}: 'text' is {type(record['text']).__name__}, not a string")
            if record["_id"] in seen:
                raise EvaluationError(f"{path} line {number}: duplicate _id {record['_id']!r}")
            seen.add(record["_id"])
            records.append((number, record))
    if not records:
        raise EvaluationError(f"{path}: no records")
    return records


def _task_name(folder: Path) -> str:
    return "Local" + (re.sub(r"[^A-Za-z0-9_-]+", "_", folder.resolve().name) or "Data")


def beir_task(folder: str | Path, name: str | None = None) -> LocalRetrievalTask:
    """Read and check a BEIR-layout folder; the task name defaults to 'Local<folder name>'."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"--data {folder}: no such folder")
    for rel in BEIR_FILES:
        if not (folder / rel).is_file():
            raise EvaluationError(f"{folder / rel}: missing (a BEIR folder holds {', '.join(BEIR_FILES)})")
    corpus = {}
    for number, record in _jsonl(folder / "corpus.jsonl", ("_id", "text")):
        title = record.get("title") or ""
        if not isinstance(title, str):
            raise EvaluationError(f"{folder / 'corpus.jsonl'} line {number}: 'title' is not a string")
        corpus[record["_id"]] = {"title": title, "text": record["text"]}
    queries, excluded = {}, {}
    for number, record in _jsonl(folder / "queries.jsonl", ("_id", "text")):
        queries[record["_id"]] = record["text"]
        ids = record.get("excluded_ids") or []
        if ids and ids != ["N/A"]:  # BRIGHT's marker for "none"
            unknown = [str(i) for i in ids if str(i) not in corpus]
            if unknown:
                raise EvaluationError(f"{folder / 'queries.jsonl'} line {number}: excluded_ids name documents not "
                                      f"in corpus.jsonl: {unknown[:5]}")
            excluded[record["_id"]] = {str(i) for i in ids}
    qrels_path = folder / "qrels" / "test.tsv"
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != ["query-id", "corpus-id", "score"]:
            raise EvaluationError(f"{qrels_path} line 1: the header must be 'query-id<TAB>corpus-id<TAB>score', "
                                  f"got {header}")
        for number, line in enumerate(handle, 2):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise EvaluationError(f"{qrels_path} line {number}: expected 3 tab-separated fields, got {len(fields)}")
            query_id, doc_id, score = fields
            if query_id not in queries:
                raise EvaluationError(f"{qrels_path} line {number}: query-id {query_id!r} is not in queries.jsonl")
            if doc_id not in corpus:
                raise EvaluationError(f"{qrels_path} line {number}: corpus-id {doc_id!r} is not in corpus.jsonl")
            try:
                qrels.setdefault(query_id, {})[doc_id] = int(score)
            except ValueError:
                raise EvaluationError(f"{qrels_path} line {number}: score {score!r} is not an integer") from None
    if not any(score > 0 for docs in qrels.values() for score in docs.values()):
        raise EvaluationError(f"{qrels_path}: no relevant (score > 0) pair")
    digest = hashlib.sha256(b"".join((folder / rel).read_bytes() for rel in BEIR_FILES)).hexdigest()[:20]
    return local_task(name or _task_name(folder), corpus, queries, qrels, excluded=excluded,
                              source=str(folder.resolve()), revision=digest,
                              description=f"Local BEIR-layout retrieval set {folder.resolve()}.")


def stdlib_task(rows: int = STDLIB_ROWS) -> LocalRetrievalTask:
    """The demo's held-out task, exactly as `diffembed demo` scores it: the first `rows` held-out rows of the
    standard-library task (`builtin_task`), turned into queries / corpus / qrels by the training-time
    evaluator's own `retrieval_task`, queries = the anchors, which already carry their instruction (so the
    query prompt is '' here), documents bare; the caller evaluates at the demo's max_seq_length (128)."""
    from ..builtin_task import HELD_OUT_MODULES, build_rows
    from ..data import resolve_columns, to_training_rows
    from .heldout import retrieval_task

    raw = Dataset.from_list(build_rows(HELD_OUT_MODULES)[:rows])
    columns, _ = to_training_rows(raw, "stdlib", resolve_columns(raw, "stdlib"))
    queries, corpus, relevant = retrieval_task(Dataset.from_dict(columns))
    digest = hashlib.sha256(json.dumps([queries, corpus], sort_keys=True).encode()).hexdigest()[:20]
    return local_task(
        STDLIB_TASK, {i: {"title": "", "text": t} for i, t in corpus.items()}, queries,
        {q: dict.fromkeys(docs, 1) for q, docs in relevant.items()}, source="diffembed-hf/stdlib-heldout",
        revision=digest, description="Python standard-library docstring summary -> function source (held-out "
        "modules), the task `diffembed demo` evaluates.")
