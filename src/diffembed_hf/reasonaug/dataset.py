"""The dataset a finished run writes: train.jsonl, corpus.jsonl, heldout/ (BEIR) and dropped.jsonl, each whole.

Problems are de-duplicated (the same text, spacing, case and typography aside, is kept once, first in file
order); the held-out concepts' checked problems become the BEIR folder's queries (with their p2i instruction in
front, as `diffembed train` puts instructions on its anchors), every definition its corpus; the other concepts make
the training rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import DiffembedError
from ..outputs import move_into_place, temporary_sibling
from .concepts import fold
from .planner import Plan, Planner
from .prompts import STAGES
from .rows import ConceptData, RowBuilder

logger = logging.getLogger(__name__)


def _norm_text(text: str) -> str:
    """The form two problems are compared in: `concepts.fold` (case, Unicode, typographic quotes and dashes),
    runs of white space as one space."""
    return " ".join(fold(text).split())


def format_query(query: str, instruction: str) -> str:
    """Instruction + query as `diffembed train` builds its anchors (data.format_query): "instruction:\\n" + query."""
    return instruction.strip().rstrip(":") + ":\n" + query


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
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HELDOUT_README = """# Held-out ReasonAug concepts (BEIR layout)

Queries: the checked problems of concepts that are not in train.jsonl, each with its p2i instruction already in
front (as `diffembed train` puts it on its anchors). Corpus: the definitions of every concept. Relevant: each
problem's own concept. Evaluate with the instruction already in the queries:

    diffembed evaluate MODEL --data {folder} --query-prompt '' --output MODEL/eval
"""


def write_dataset(out: Path, planner: Planner, plan: Plan, answers: dict) -> dict:
    """train.jsonl, corpus.jsonl, dropped.jsonl and heldout/, each written whole; returns the dataset's counts."""
    settings, prompts = planner.settings, planner.prompts
    heldout = set(planner.heldout())
    # duplicates: the same problem text (spacing, case and typography aside) is kept once, first in file order
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
