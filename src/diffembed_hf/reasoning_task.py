"""The built-in reasoning task: a problem -> the definition of the theorem, algorithm or formula it needs.

The kind of retrieval the DiffEmbed study is about (BRIGHT's TheoremQA-Theorems): the words of a problem and of the
concept it needs overlap little, so matching them takes more than shared terms. The rows are the study's own
ReasonAug generations (MIT licence; `reasoning_data/README.md` and `LICENSE-DiffEmbed` say where from), shipped
with the package so that the demo and the benchmarks run offline:

* `train.jsonl` - 835 training rows in ReasonAug's columns (`user_query`, `positive_document`,
  `hard_negative_document`, `task`, ...), which `diffembed train` reads as they are;
* `dev/` - a BEIR folder of 96 problems of 33 concepts that no training row mentions, ranked against 209
  definitions: held out, for judging a model on concepts it has never seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .sentence_transformer import instruction_prompt

FOLDER = Path(__file__).resolve().parent / "reasoning_data"
TRAIN_FILE = FOLDER / "train.jsonl"
HELD_OUT_FOLDER = FOLDER / "dev"


@dataclass
class RetrievalTask:
    """A retrieval task as ids -> texts: queries (without instruction), corpus, relevant ids per query, and the
    prompt a model puts before each query."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]
    query_prompt: str


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def instruction() -> str:
    """The task's instruction (the study's for TheoremQA-Theorems)."""
    return json.loads((FOLDER / "stats.json").read_text(encoding="utf-8"))["instruction"]


def training_rows() -> list[dict]:
    """The training rows as shipped (ReasonAug's columns)."""
    return _jsonl(TRAIN_FILE)


def held_out_task(folder: Path = HELD_OUT_FOLDER) -> RetrievalTask:
    """The held-out BEIR folder as a task: every query ranks the whole corpus."""
    relevant: dict[str, set[str]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        query, document, score = line.split("\t")
        if int(score) > 0:
            relevant.setdefault(query, set()).add(document)
    return RetrievalTask({q["_id"]: q["text"] for q in _jsonl(folder / "queries.jsonl")},
                         {d["_id"]: (d.get("title", "") + " " + d["text"]).strip()
                          for d in _jsonl(folder / "corpus.jsonl")},
                         relevant, instruction_prompt(instruction()))
