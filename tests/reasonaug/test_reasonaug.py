"""`diffembed reasonaug` against a local OpenAI-compatible server of the tests' own (tests/helpers/openai_server.py),
driven through the real `openai` client: the rows `diffembed train` reads, the held-out BEIR folder `diffembed
evaluate --data` reads, byte-identical reruns, a SIGKILL mid-run that sends no journaled request again, hard negatives
equal to an independent BM25, the checker's drops, and every bad input named and counted."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers.openai_server import ChatServer, ReasonAugResponder, body_key

from diffembed_hf.cli import main
from diffembed_hf.reasonaug import ConceptsError, PromptsError, generate_reasonaug, load_concepts, load_prompts
from diffembed_hf.reasonaug.client import ServerError
from diffembed_hf.reasonaug.journal import Journal, JournalError, request_key

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENAI_API_KEY="")
CONCEPTS = """\
domains:
  algorithm:
    question_type: coding
    concepts: [Two Pointers, Prefix Sum, Binary Search, Dijkstra's Algorithm, Union-Find, Topological Sorting]
  math theorem:
    question_type: math
    topics: [a harbour, a school timetable]
    references: [the AMC 12]
    concepts: [Pigeonhole Principle, Vieta's Formulas, Chinese Remainder Theorem, Law of Cosines, Stars and Bars]
"""
OUTPUTS = ("train.jsonl", "corpus.jsonl", "dropped.jsonl", "heldout/corpus.jsonl", "heldout/queries.jsonl",
           "heldout/qrels/test.tsv")
FAST = dict(problems_per_concept=3, heldout_fraction=0.2, workers=4, retry_delay=0.01, timeout=5.0)


@pytest.fixture
def concepts(tmp_path) -> Path:
    path = tmp_path / "concepts.yaml"
    path.write_text(CONCEPTS, encoding="utf-8")
    return path


def responder_for(concepts_path: Path, prompts=None) -> ReasonAugResponder:
    concept_set = load_concepts(concepts_path)
    return ReasonAugResponder(prompts or load_prompts(), {d.name: list(d.concepts) for d in concept_set})


@pytest.fixture
def server(concepts):
    with ChatServer(responder_for(concepts)) as chat_server:
        yield chat_server


def outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def generate(concepts, out, server, **kwargs):
    return generate_reasonaug(concepts, out, model="test-model", base_url=server.url, **{**FAST, **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# 1. The dataset: rows diffembed train reads, a held-out folder diffembed evaluate reads, the run's record
# ----------------------------------------------------------------------------------------------------------------


def test_outputs_are_the_columns_train_reads_and_a_beir_folder(concepts, server, tmp_path):
    from diffembed_hf.training_data import format_query, load_training_data
    from diffembed_hf.evaluation.local import beir_task
    from diffembed_hf.reasonaug.dataset import format_query as our_format_query

    result = generate(concepts, tmp_path / "out", server)
    out = tmp_path / "out"
    assert result.status == "complete"
    rows = jsonl(out / "train.jsonl")
    columns = ["id", "domain", "instance", "task_type", "task", "user_query", "positive_document",
               "hard_negative_document", "negative_instance"]
    assert [list(row) for row in rows] == [columns] * len(rows)
    assert Counter(row["task_type"] for row in rows).keys() == {"p2i", "i2ps", "p2ps", "ps2ps"}
    heldout = set(result.summary["heldout_concepts"])
    assert heldout and {row["instance"] for row in rows}.isdisjoint(heldout)
    assert {row["negative_instance"] for row in rows}.isdisjoint(heldout)
    domain_of = {c: d.name for d in load_concepts(concepts) for c in d.concepts}
    for row in rows:
        assert row["negative_instance"] != row["instance"] and domain_of[row["negative_instance"]] == row["domain"]
        assert row["task"] == load_prompts().instruction(row["task_type"], load_concepts(concepts).domains[
            0 if row["domain"] == "algorithm" else 1])

    # diffembed train's reader takes the rows as they are: the instruction before the query, one negative per row
    data = load_training_data(str(out / "train.jsonl"))
    assert data.train.column_names == ["anchor", "positive", "negative_1"] and len(data.train) == len(rows)
    assert data.train[0]["anchor"] == format_query(rows[0]["user_query"], rows[0]["task"])
    assert our_format_query("q", "Given a problem:") == format_query("q", "Given a problem:")

    # the held-out folder is a BEIR folder evaluate reads: held-out problems -> their own concept's definition
    task = beir_task(out / "heldout")
    task.load_data()
    corpus = {d["_id"]: d for d in jsonl(out / "corpus.jsonl")}
    assert len(corpus) == len(domain_of) == result.summary["definitions"]
    queries = jsonl(out / "heldout" / "queries.jsonl")
    assert queries and {q["concept"] for q in queries} == heldout
    qrels = [line.split("\t") for line in (out / "heldout/qrels/test.tsv").read_text().splitlines()[1:]]
    for (query_id, doc_id, score), query in zip(qrels, queries):
        assert query_id == query["_id"] and corpus[doc_id]["title"] == query["concept"] and score == "1"
        assert query["text"].startswith("Given a ")
    train_text = (out / "train.jsonl").read_text()
    assert not any(q["text"].split(":\n", 1)[1] in train_text for q in queries)  # held-out problems never train

    record = json.loads((out / "run.json").read_text())
    assert record["complete"] and record["model"] == "test-model" and record["prompts"] == load_prompts().data
    assert record["settings"]["problems_per_concept"] == 3 and record["settings"]["temperature"] == 1.0
    assert record["diffembed_hf_version"] and record["concepts"]["sha256"]
    answered = server.answered_keys()
    assert result.summary["requests"]["answered"] == len(answered) == len(set(answered)) == result.traffic["sent"]
    assert result.summary["requests"]["by_stage"] == {"definition": 11, "problem": 33, "check": 33}


def test_same_seed_same_bytes_other_seed_other_rows(concepts, server, tmp_path):
    generate(concepts, tmp_path / "a", server)
    generate(concepts, tmp_path / "b", server)
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    generate(concepts, tmp_path / "c", server, seed=1)  # control: the seed matters (topics, request seeds, rows)
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# 2. Hard negatives: an independent BM25 (Lucene's variant, written here) picks the same documents
# ----------------------------------------------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    from bm25s.stopwords import STOPWORDS_EN  # the word list only; tokenising and scoring are ours

    stop = set(STOPWORDS_EN)
    return [w for w in re.findall(r"\b\w\w+\b", text.lower()) if w not in stop]


def bm25_scores(documents: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    docs = [tokens(d) for d in documents]
    average = sum(map(len, docs)) / len(docs)
    frequency = Counter(w for d in docs for w in set(d))
    scores = []
    for doc in docs:
        counts, score = Counter(doc), 0.0
        for word in set(tokens(query)):
            if counts[word]:
                idf = math.log(1 + (len(docs) - frequency[word] + 0.5) / (frequency[word] + 0.5))
                score += idf * counts[word] * (k1 + 1) / (counts[word] + k1 * (1 - b + b * len(doc) / average))
        scores.append(score)
    return scores


def best(candidates: list[int], scores: list[float]) -> set[int]:
    """The allowed candidates with the top score (near ties, float32 against float64, accept either)."""
    top = max(scores[i] for i in candidates)
    return {i for i in candidates if scores[i] >= top - 1e-5 * max(1.0, abs(top))}


def test_hard_negatives_equal_an_independent_bm25_ranking(concepts, server, tmp_path):
    result = generate(concepts, tmp_path / "out", server, problems_per_concept=4, heldout_fraction=0.0)
    rows = jsonl(tmp_path / "out" / "train.jsonl")
    concept_set = load_concepts(concepts)
    domain_of = {c: d.name for d in concept_set for c in d.concepts}
    names = [c for d in concept_set for c in d.concepts]
    definitions = {d["title"]: d["text"] for d in jsonl(tmp_path / "out" / "corpus.jsonl")}
    def_texts = [f"{name}\n{definitions[name]}" for name in names]
    checked = {}  # concept -> its (problem, solution) pairs, from the journal of this run, in order
    for record in sorted(jsonl(tmp_path / "out" / "journal.jsonl"), key=lambda r: r["item"]):
        if record["stage"] == "check":
            prompt = record["body"]["messages"][-1]["content"]
            problem = re.search(r"\*\*Problem\*\*\n(.*?)\n\*\*Solution\*\*", prompt, re.S).group(1)
            code = re.search(r"```python\n(.*?)```", record["answer"]["content"], re.S)
            solution = code.group(1).strip("\n") if code else re.search(r"\*\*Solution\*\*\n(.*?)\n\nIs this", prompt,
                                                                         re.S).group(1)
            checked.setdefault(record["item"].split(" | ")[2], []).append((problem, solution))
    problems = [(c, p) for c in names for p in checked[c]]
    naive_choices = 0
    used = {c: set() for c in names}
    for row in (r for r in rows if r["task_type"] == "p2i"):
        scores = bm25_scores(def_texts, row["user_query"])
        allowed = [i for i, n in enumerate(names) if domain_of[n] == row["domain"] and n != row["instance"]
                   and n not in used[row["instance"]]]
        expected = {names[i] for i in best(allowed, scores)}
        assert row["negative_instance"] in expected, (row["user_query"], row["negative_instance"], expected)
        if row["negative_instance"] != names[allowed[0]]:
            naive_choices += 1
        assert row["hard_negative_document"] in (row["negative_instance"], definitions[row["negative_instance"]])
        used[row["instance"]].add(row["negative_instance"])
        # the next p2i row of the same problem takes the next best (never the same concept twice for a concept)
    assert naive_choices > 0  # control: BM25 decides, not the file order

    # p2ps / ps2ps: per query problem, the best-ranked problems of other concepts of the domain, one per concept,
    # none used twice for the same concept; each row takes its query's next one
    problem_texts = [p for _, (p, _) in problems]
    for concept in names:
        own = checked[concept]
        queue, used_problems = {}, set()
        for problem, _ in own:
            scores, chosen, concepts_taken = bm25_scores(problem_texts, problem), [], set()
            for index in sorted(range(len(problems)), key=lambda i: (-scores[i], i)):
                owner, (text, _) = problems[index]
                if (domain_of[owner] == domain_of[concept] and owner != concept and owner not in concepts_taken
                        and text not in used_problems):
                    chosen.append((owner, index, scores[index]))
                    concepts_taken.add(owner)
                    used_problems.add(text)
                    if len(chosen) == len(own) - 1:
                        break
            queue[problem] = chosen
        for row in (r for r in rows if r["instance"] == concept and r["task_type"] in ("p2ps", "ps2ps")):
            query_problem = next(p for p, _ in own if row["user_query"] == p or row["user_query"].startswith(p + "\n"))
            owner, index, score = queue[query_problem].pop(0)
            if row["negative_instance"] != owner:  # only a near tie may differ
                other = next(i for i, (c, _) in enumerate(problems) if c == row["negative_instance"])
                assert abs(bm25_scores(problem_texts, query_problem)[other] - score) < 1e-5
            assert domain_of[row["negative_instance"]] == domain_of[concept] and row["negative_instance"] != concept
    assert result.summary["rows"]["p2ps"] + result.summary["rows"].get("ps2ps", 0) > 0


def test_row_builder_ranks_with_bm25s_against_the_same_scores():
    """The ranking inside the pipeline is a full, stable sort of bm25s's scores: equal to the independent BM25's
    order on texts without ties."""
    from diffembed_hf.reasonaug.negatives import BM25Ranking

    texts = ["binary search halves a sorted array each step", "a queue visits nodes level by level in a graph",
             "prefix sums answer range sum queries on an array", "sorted array binary halves search step search"]
    query = "find a value in a sorted array by halving"
    scores = bm25_scores(texts, query)
    assert BM25Ranking(texts).rank(query) == sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    assert BM25Ranking(texts).rank("no shared words whatsoever") == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# 3. The checker drops what it should
# ----------------------------------------------------------------------------------------------------------------


def test_checker_no_never_reaches_train_jsonl(concepts, tmp_path):
    control_server = ChatServer(responder_for(concepts)).start()
    try:
        generate(concepts, tmp_path / "control", control_server, heldout_fraction=0.0)
    finally:
        control_server.stop()
    journal = jsonl(tmp_path / "control" / "journal.jsonl")
    problem_of = {r["item"]: re.search(r"\*\*Problem\*\*\n(.*?)\n\*\*Solution\*\*", r["answer"]["content"], re.S)
                  .group(1) for r in journal if r["stage"] == "problem"}
    rejected = {problem_of["problem | algorithm | Binary Search | #2 | try 0"],
                problem_of["problem | math theorem | Law of Cosines | #1 | try 0"],
                problem_of["problem | math theorem | Law of Cosines | #3 | try 0"]}
    kept = problem_of["problem | math theorem | Law of Cosines | #2 | try 0"]
    control_text = (tmp_path / "control" / "train.jsonl").read_text()
    assert all(json.dumps(p)[1:-1] in control_text for p in rejected | {kept})  # control: they were rows before

    with ChatServer(responder_for(concepts)) as chat_server:
        chat_server.fail("no", lambda body: any(f"**Problem**\n{p}\n" in body["messages"][-1]["content"]
                                                for p in rejected))
        result = generate(concepts, tmp_path / "out", chat_server, heldout_fraction=0.0)
    train_text = (tmp_path / "out" / "train.jsonl").read_text()
    assert not any(json.dumps(p)[1:-1] in train_text for p in rejected)
    assert json.dumps(kept)[1:-1] in train_text
    assert result.summary["dropped"]["check"] == {"checker_no": 3}
    dropped = jsonl(tmp_path / "out" / "dropped.jsonl")
    assert sorted((d["concept"], d["index"], d["reason"]) for d in dropped) == [
        ("Binary Search", 2, "checker_no"), ("Law of Cosines", 1, "checker_no"), ("Law of Cosines", 3, "checker_no")]
    assert result.summary["problems"] == {"asked": 33, "checked": 30, "kept": 30}


@pytest.mark.parametrize("content, finish, expected", [
    ("**Problem**\nFind x.\n**Solution**\nx = 2.", "stop", ("Find x.", "x = 2.")),
    ("**Problem:** Find x.\n\n**Solution:** x = 2.", "stop", ("Find x.", "x = 2.")),
    ("## Problem\nFind x.\n## Solution\nx = 2.", "stop", ("Find x.", "x = 2.")),
    ("Problem: Find x.\nSolution: x = 2.", "stop", ("Find x.", "x = 2.")),
    ("**Problem**\nFind x.\n**Solution**\nx = 2.", "length", "truncated"),
    ("Find x. The answer is 2.", "stop", "missing_sections"),
    ("I'm sorry, but I can't help with that.", "stop", "refusal"),
    ("  ", "stop", "empty"),
    ("**Problem**\nUse a depth first search on the maze.\n**Solution**\nok", "stop", "names_concept"),
    ("**Problem**\nRun DFS on the maze.\n**Solution**\nok", "stop", "names_concept"),
    ("**Problem**\nExplore the maze branch by branch.\n**Solution**\nDFS does it.", "stop",
     ("Explore the maze branch by branch.", "DFS does it.")),
])
def test_problem_answers_are_read_or_named(content, finish, expected):
    from diffembed_hf.reasonaug.answers import parse_problem

    parsed = parse_problem({"content": content, "finish_reason": finish}, "Depth First Search (DFS)")
    assert (parsed.sections if isinstance(expected, tuple) else parsed.failure) == expected


@pytest.mark.parametrize("problem, concept", [
    ("Use Bayes\u2019 theorem to update the belief.", "Bayes' Theorem"),
    ("Count them with the inclusion\u2013exclusion principle.", "Inclusion-Exclusion Principle"),
    ("Count them by inclusion exclusion principles.", "Inclusion-Exclusion Principle"),
    ("Apply BAYES\u2019S THEOREM.", "Bayes' Theorem"),
    ("Run Dijkstra\u2019s algorithm from the depot.", "Dijkstra's Algorithm"),
    ("Run Dijkstra algorithms from the depot.", "Dijkstra's Algorithm"),
    ("Keep a union\u2014find of the islands.", "Union-Find"),
    ("Keep a unionfind of the islands.", "Union-Find"),
    ("Use two-pointers over the array.", "Two Pointers"),
    ("By Vieta\u2019s formula the sum is 3.", "Vieta's Formulas"),
    ("Use the B\u00e9zout identity.", "Bezout's Identity"),
    ("A \uff24\uff26\uff33 over the maze.", "Depth First Search (DFS)"),  # full-width letters (NFKC)
    ("Keep an LRU cache.", "LRU Caches"),
])
def test_a_problem_naming_its_concept_in_another_spelling_is_unusable(problem, concept):
    from diffembed_hf.reasonaug.answers import names_concept, parse_problem

    assert names_concept(problem, concept)
    parsed = parse_problem({"content": f"**Problem**\n{problem}\n**Solution**\nok", "finish_reason": "stop"}, concept)
    assert parsed.failure == "names_concept"


@pytest.mark.parametrize("problem, concept", [
    ("Sort the heapsort output.", "Heap"), ("Sum a prefix array.", "Prefix Sum"), ("A search party.", "A* Search"),
    ("The bay theorem of the harbour.", "Bayes' Theorem"),
])
def test_other_words_are_not_the_concept(problem, concept):
    from diffembed_hf.reasonaug.answers import names_concept

    assert not names_concept(problem, concept)


def test_spellings_of_a_concept_never_reach_train_and_are_one_concept_in_the_concepts_file(concepts, tmp_path):
    """A problem that names its concept in another spelling is asked again, then dropped, at every stage: the run's
    plan, the concepts file and the duplicate problems all compare names one way."""
    from diffembed_hf.reasonaug.dataset import _norm_text

    leaks = {"Dijkstra's Algorithm": "Route the vans with Dijkstra\u2019s algorithm.",
             "Union-Find": "Merge the islands with a union\u2013find.",
             "Vieta's Formulas": "By VIETA\u2019S FORMULA, the roots sum to 3."}
    responder = responder_for(concepts)

    def answer(body: dict) -> str:
        if responder.stage(body) == "problem" and responder.concept(body)[1] in leaks:
            return f"**Problem**\n{leaks[responder.concept(body)[1]]}\n**Solution**\nok"
        return responder(body)

    with ChatServer(answer) as chat_server:
        result = generate(concepts, tmp_path / "out", chat_server, heldout_fraction=0.0)
    assert result.summary["unusable_answers"]["problem"] == {"names_concept": 3 * 3 * 2}  # 3 problems, 2 tries each
    assert result.summary["dropped"]["problem"] == {"names_concept": 3 * 3}
    train = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    assert not any(json.dumps(leak)[1:-1] in train for leak in leaks.values())
    assert {d["concept"] for d in jsonl(tmp_path / "out" / "dropped.jsonl")} == set(leaks)

    path = tmp_path / "spellings.yaml"
    path.write_text("domains:\n  math:\n    question_type: math\n    concepts: [Bayes' Theorem, Law of Cosines, "
                    "\"Bayes\u2019 theorem\"]\n", encoding="utf-8")
    with pytest.raises(ConceptsError, match="the concept 'Bayes\u2019 theorem' .* is listed twice: \"Bayes' Theorem\""):
        load_concepts(path)
    assert _norm_text("Find the \u201cfast\u201d path \u2014 quickly.") == _norm_text('find the "fast" path - quickly.')


@pytest.mark.parametrize("content, coding, expected", [
    ("YES.", False, ("orig",)), ("**Yes**, correct.", False, ("orig",)), ("No, wrong.", False, "checker_no"),
    ("The solution is right.", False, "checker_no"), ("NO", True, "checker_no"),
    ("Here:\n```python\ndef f():\n    return 1\n```", True, ("def f():\n    return 1",)),
    ("Looks right to me.", True, "checker_no"), ("", True, "empty"),
])
def test_checker_verdicts(content, coding, expected):
    from diffembed_hf.reasonaug.checker import verdict

    parsed = verdict({"content": content, "finish_reason": "stop"}, coding=coding, solution="orig")
    assert (parsed.sections if isinstance(expected, tuple) else parsed.failure) == expected


# ----------------------------------------------------------------------------------------------------------------
# 4. Failures: retried (transport), asked again (content), or dropped, each counted; never a half file
# ----------------------------------------------------------------------------------------------------------------


def _is(stage_text: str):
    return lambda body: stage_text in body["messages"][-1]["content"]


def test_transport_failures_are_retried_counted_and_change_nothing(concepts, tmp_path):
    with ChatServer(responder_for(concepts)) as clean:
        generate(concepts, tmp_path / "clean", clean)
    with ChatServer(responder_for(concepts), stall=8.0) as chat_server:
        chat_server.fail("429", _is('"Prefix Sum"'), times=2)
        chat_server.fail("500", _is('"Law of Cosines"'), times=2)
        chat_server.fail("not_json", _is('"Two Pointers"'), times=1)
        chat_server.fail("timeout", _is('"Stars and Bars"'), times=1)
        result = generate(concepts, tmp_path / "out", chat_server, timeout=3.0)  # far above a loaded machine's delays
    assert result.traffic["retried"] == {"rate_limited": 2, "server_error": 2, "bad_response": 1, "timeout": 1}
    assert result.traffic["failed"] == {}
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")


def problem_of(concept: str):
    return lambda body: (f'"{concept}"' in body["messages"][-1]["content"]
                         and body["messages"][0]["content"].startswith("You write new"))


def test_unusable_answers_are_asked_again_with_a_new_seed_then_dropped(concepts, tmp_path):
    with ChatServer(responder_for(concepts)) as chat_server:
        definition = _is('reference entry for the algorithm "Binary Search"')
        chat_server.fail("empty", definition, times=1)  # asked again: fixed
        chat_server.fail("refusal", _is('reference entry for the math theorem "Stars and Bars"'))  # never fixed
        chat_server.fail("no_sections", problem_of("Union-Find"), times=2)
        chat_server.fail("length", problem_of("Vieta's Formulas"), times=1)
        result = generate(concepts, tmp_path / "out", chat_server, heldout_fraction=0.0)
        retried = [e["body"] for e in chat_server.log if definition(e["body"])]
    assert len(retried) == 2 and retried[0]["seed"] != retried[1]["seed"]
    assert retried[0]["messages"] == retried[1]["messages"]
    unusable = result.summary["unusable_answers"]
    assert unusable["definition"] == {"empty": 1, "refusal": 2}
    assert unusable["problem"] == {"missing_sections": 2, "truncated": 1}
    assert result.summary["dropped"] == {"definition": {"refusal": 1}}
    assert result.summary["definitions"] == 10  # Stars and Bars has none: no p2i or i2ps rows, p2ps rows still
    rows = jsonl(tmp_path / "out" / "train.jsonl")
    kinds = {r["task_type"] for r in rows if r["instance"] == "Stars and Bars"}
    assert "p2ps" in kinds and not kinds & {"p2i", "i2ps"}
    assert "Stars and Bars" not in {d["title"] for d in jsonl(tmp_path / "out" / "corpus.jsonl")}
    assert [d["reason"] for d in jsonl(tmp_path / "out" / "dropped.jsonl")] == ["refusal"]


def test_each_file_holds_what_the_guide_says_of_unusable_and_dropped_answers(concepts, tmp_path):
    """dropped.jsonl: what never made it; an answer asked again and then answered only counted in run.json, its
    text in journal.jsonl. The ReasonAug guide's description of the OUT files says exactly that."""
    guide = " ".join((ROOT / "docs" / "guides" / "reasonaug.md").read_text(encoding="utf-8").split())
    assert "`dropped.jsonl` (every unusable answer" not in guide
    for claim in ("`dropped.jsonl` holds one line (`stage, domain, concept, index, reason, answer`) per definition, "
                  "problem or check that never made it", "An unusable answer that was asked again and then answered "
                  "is not in it: it is counted in `run.json` (`summary.unusable_answers`",
                  "its text stays in `journal.jsonl`, which holds every answer"):
        assert claim in guide, claim
    out = tmp_path / "out"
    with ChatServer(responder_for(concepts)) as chat_server:
        chat_server.fail("empty", _is('reference entry for the algorithm "Binary Search"'), times=1)  # then answered
        chat_server.fail("refusal", _is('reference entry for the math theorem "Stars and Bars"'))  # never answered
        chat_server.fail("no", lambda body: body["messages"][0]["content"].startswith("You are a strict")
                         and "Report the value for case" in body["messages"][-1]["content"], times=1)
        generate(concepts, out, chat_server, heldout_fraction=0.0)
    dropped = jsonl(out / "dropped.jsonl")
    assert [list(d) for d in dropped] == [["stage", "domain", "concept", "index", "reason", "answer"]] * 2
    assert sorted((d["stage"], d["reason"], d["index"] is None) for d in dropped) == [
        ("check", "checker_no", False), ("definition", "refusal", True)]
    assert not any(d["concept"] == "Binary Search" and d["stage"] == "definition" for d in dropped)
    summary = json.loads((out / "run.json").read_text(encoding="utf-8"))["summary"]
    assert summary["unusable_answers"]["definition"] == {"empty": 1, "refusal": 2}
    assert summary["dropped"] == {"definition": {"refusal": 1}, "check": {"checker_no": 1}}
    asked = [r["answer"]["content"] for r in jsonl(out / "journal.jsonl")
             if r["stage"] == "definition" and '"Binary Search"' in r["body"]["messages"][-1]["content"]]
    assert len(asked) == 2 and "" in asked  # the unusable answer and the one that replaced it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_that_is_down_stops_the_run_with_its_name_and_nothing_half_written(concepts, tmp_path, capsys):
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{free_port()}/v1"
    status = main(["reasonaug", str(concepts), str(out), "--model", "test-model", "--base-url", url,
                   "--max-retries", "1", "--problems-per-concept", "2"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("diffembed reasonaug: error: cannot use the server at") and url in err
    assert "connection failed" in err and len(err.strip().splitlines()) == 1
    assert not any((out / name).exists() for name in ("train.jsonl", "corpus.jsonl", "heldout"))


def test_a_request_failing_for_good_stops_the_run_and_a_rerun_sends_only_the_rest(concepts, tmp_path):
    out = tmp_path / "out"
    with ChatServer(responder_for(concepts)) as chat_server:
        chat_server.fail("500", _is('"Prefix Sum"'))  # every try of these
        with pytest.raises(ServerError, match=r"HTTP 5xx .* run the same command again"):
            generate(concepts, out, chat_server, max_retries=2)
        assert not (out / "train.jsonl").exists()
        first = set(chat_server.answered_keys())
        with Journal(out) as journal:
            assert first and first <= set(journal.answers)  # every answer that arrived is journaled
        chat_server.faults.clear()
        chat_server.log.clear()
        result = generate(concepts, out, chat_server)
        again = chat_server.answered_keys()
    assert result.status == "complete" and again and first.isdisjoint(again)
    assert result.traffic["replayed"] == len(first)


@pytest.mark.parametrize("progress", [False, True])
def test_the_stop_message_counts_the_journaled_answers_with_or_without_a_progress_bar(concepts, tmp_path, progress):
    """The count comes from the journal: a progress bar switched off (stderr not a terminal) counts nothing."""
    out = tmp_path / "out"
    with ChatServer(responder_for(concepts)) as chat_server:
        chat_server.fail("500", _is('"Prefix Sum"'))
        with pytest.raises(ServerError) as error:
            generate(concepts, out, chat_server, max_retries=0, show_progress=progress)
    arrived, other = map(int, re.search(r"the (\d+) answers that arrived .* send the other (\d+)$",
                                        str(error.value)).groups())
    with Journal(out) as journal:
        assert arrived == len(journal.answers) > 0
    assert arrived + other == 11 + 11 * 3  # the first wave: a definition and 3 problems per concept


# ----------------------------------------------------------------------------------------------------------------
# 5. SIGKILL mid-run, rerun: no answered request is sent again, and the outputs equal an uninterrupted run's
# ----------------------------------------------------------------------------------------------------------------


def cli(concepts: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffembed_hf", "reasonaug", str(concepts), str(out), "--model", "test-model",
            "--base-url", url, "--problems-per-concept", "3", "--heldout-fraction", "0.2", "--workers", "4", *extra]


def test_sigkill_mid_run_then_rerun_sends_no_journaled_request_again(concepts, tmp_path):
    with ChatServer(responder_for(concepts)) as clean:
        generate(concepts, tmp_path / "clean", clean)
    out = tmp_path / "out"
    with ChatServer(responder_for(concepts), delay=0.1) as chat_server:
        process = subprocess.Popen(cli(concepts, out, chat_server.url), env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        journal = out / "journal.jsonl"
        deadline = time.monotonic() + 120
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 30):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(0.3)  # let the server finish the answers it was writing when the client died
        killed_keys = {json.loads(line)["key"] for line in journal.read_text().splitlines()}
        assert 30 <= len(killed_keys) < 77 and not (out / "train.jsonl").exists()
        with open(journal, "a") as handle:  # a torn last line, as a kill during a write leaves it
            handle.write('{"key": "0123", "stage": "prob')
        before = len(chat_server.log)
        rerun = subprocess.run(cli(concepts, out, chat_server.url), env=ENV, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        rerun_keys = [e["key"] for e in chat_server.log[before:] if e["answered"]]
        first_keys = [e["key"] for e in chat_server.log[:before] if e["answered"]]
    assert killed_keys.isdisjoint(rerun_keys)  # no answered (journaled) request is sent again
    twice = set(first_keys) & set(rerun_keys)  # the only repeats: in flight at the kill, answered but not journaled
    assert twice <= set(first_keys) - killed_keys and len(twice) <= 4
    assert len(set(rerun_keys)) == len(rerun_keys) == 77 - len(killed_keys)
    assert outputs(out) == outputs(tmp_path / "clean")
    sent, replayed = map(int, re.search(r"this run sent (\d+), replayed (\d+)", rerun.stderr).groups())
    assert (sent, replayed) == (77 - len(killed_keys), len(killed_keys))


def test_journal_keeps_whole_records_and_drops_a_torn_line(tmp_path):
    record = {"key": request_key({"a": 1}), "stage": "problem", "item": "x", "body": {"a": 1},
              "answer": {"content": "hi"}}
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "key": "b"}))  # the second has no newline
    with Journal(tmp_path) as journal:
        assert set(journal.answers) == {record["key"], "b"} and not journal.torn_line
        journal.append({**record, "key": "c"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == [record["key"], "b", "c"]
    path.write_text(json.dumps(record) + "\n" + '{"key": "c", "ans')
    with Journal(tmp_path) as journal:
        assert set(journal.answers) == {record["key"]} and journal.torn_line
    assert path.read_text() == json.dumps(record) + "\n"
    path.write_text("not json\n" + json.dumps(record) + "\n")
    with pytest.raises(JournalError, match="line 1: not a journal record"):
        with Journal(tmp_path):
            pass
    path.write_text(json.dumps(record) + "\n")
    with Journal(tmp_path) as journal:  # the refused journal released its lock
        assert set(journal.answers) == {record["key"]}
    assert request_key({"b": 1, "a": [1, "é"]}) == body_key({"a": [1, "é"], "b": 1})  # same digest as the server's


def test_one_run_per_folder(concepts, server, tmp_path):
    from diffembed_hf.errors import UsageError

    generate(concepts, tmp_path / "out", server)
    with Journal(tmp_path / "out"):  # another run holds the folder
        with pytest.raises(UsageError, match="being written by another run"):
            generate(concepts, tmp_path / "out", server)


# ----------------------------------------------------------------------------------------------------------------
# 6. The Batch API path gives the same dataset
# ----------------------------------------------------------------------------------------------------------------


def run_batch(input_path: Path, output_path: Path, server: ChatServer, fail_first: bool = False) -> None:
    """What the Batch API does with an input file: each line's body to /v1/chat/completions, one output line each
    (in reverse order, as results may come in any order), the first one failed if asked."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    lines = []
    for number, line in enumerate(input_path.read_text().splitlines()):
        request = json.loads(line)
        assert request["method"] == "POST" and request["url"] == "/v1/chat/completions"
        if fail_first and number == 0:
            lines.append({"id": "b0", "custom_id": request["custom_id"], "response": {"status_code": 500, "body": {}},
                          "error": None})
            continue
        body = client.chat.completions.create(**request["body"]).model_dump()
        lines.append({"id": f"b{number}", "custom_id": request["custom_id"],
                      "response": {"status_code": 200, "request_id": "r", "body": body}, "error": None})
    output_path.write_text("".join(json.dumps(line) + "\n" for line in reversed(lines)))


def test_batch_file_then_batch_output_gives_the_same_dataset(concepts, server, tmp_path, capsys):
    generate(concepts, tmp_path / "direct", server)
    out, before = tmp_path / "out", len(server.log)
    args = ["reasonaug", str(concepts), str(out), "--model", "test-model", "--problems-per-concept", "3",
            "--heldout-fraction", "0.2"]
    rounds = 0
    batch_output = None
    while True:
        batch_input = tmp_path / f"batch-{rounds}.jsonl"
        extra = ["--batch-file", str(batch_input)]
        extra += ["--from-batch-output", str(batch_output)] if batch_output else []
        assert main(args + extra) == 0
        err = capsys.readouterr().err
        if not batch_input.exists():
            break
        assert f"requests written to {batch_input}" in err
        assert len(server.log) == before  # nothing was sent: the requests are in the file
        batch_output = tmp_path / f"results-{rounds}.jsonl"
        run_batch(batch_input, batch_output, server, fail_first=rounds == 0)
        before = len(server.log)
        rounds += 1
        assert rounds < 5
    assert rounds == 2  # definitions + problems; then the checks, with the one failed line asked again
    failed = json.loads((tmp_path / "batch-0.jsonl").read_text().splitlines()[0])["custom_id"]
    assert failed in (tmp_path / "batch-1.jsonl").read_text()
    assert "ReasonAug: 11 concepts" in err
    assert outputs(out) == outputs(tmp_path / "direct")


def batch_args(concepts: Path, out: Path, *extra) -> list[str]:
    return ["reasonaug", str(concepts), str(out), "--model", "test-model", "--problems-per-concept", "3",
            "--heldout-fraction", "0.2", *map(str, extra)]


def test_a_batch_output_line_with_an_error_text_is_counted_and_asked_again(concepts, tmp_path, capsys):
    """vLLM's run_batch writes `error` as a string: the line is a failed one, its request goes into the next file."""
    out = tmp_path / "out"
    assert main(batch_args(concepts, out, "--batch-file", tmp_path / "batch-0.jsonl")) == 0
    first, second = [json.loads(line)["custom_id"] for line in
                     (tmp_path / "batch-0.jsonl").read_text().splitlines()[:2]]
    results = tmp_path / "results-0.jsonl"
    results.write_text(json.dumps({"custom_id": first, "response": None, "error": "rate limited"}) + "\n"
                       + json.dumps({"custom_id": second, "response": {"status_code": 400, "body": None},
                                     "error": "the prompt is too long\nat line 3"}) + "\n")
    capsys.readouterr()
    assert main(batch_args(concepts, out, "--from-batch-output", results, "--batch-file",
                           tmp_path / "batch-1.jsonl")) == 0
    assert "failed lines: rate limited 1, HTTP 400 1" in capsys.readouterr().err
    again = [json.loads(line)["custom_id"] for line in (tmp_path / "batch-1.jsonl").read_text().splitlines()]
    assert first in again and second in again


def _completion_line(key: str, **changes) -> dict:
    body = {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    line = {"custom_id": key, "response": {"status_code": 200, "body": body}, "error": None}
    for path, value in changes.items():
        *parents, last = path.split(".")
        target = line
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return line


@pytest.mark.parametrize("changes, message", [
    ({"response": "oops"}, "line 2: response is a string 'oops', not a JSON object or null"),
    ({"error": ["x"]}, "line 2: error is a list, not a JSON object, a string or null"),
    ({"response.body": "text"}, "line 2: response.body is a string 'text', not a JSON object"),
    ({"response.body.choices": {"0": 1}}, "line 2: response.body.choices is an object, not a list"),
    ({"response.body.choices": ["hi"]}, "line 2: response.body.choices[0] is a string 'hi', not a JSON object"),
    ({"response.body.choices.0.message": "hi"}, "line 2: response.body.choices[0].message is a string 'hi'"),
    ({"response.body.choices.0.message.content": 5}, "line 2: response.body.choices[0].message.content is a number"),
    ({"response.body.usage": {"prompt_tokens": "12"}}, "line 2: response.body.usage.prompt_tokens is a string '12'"),
    ({"custom_id": None}, "line 2: not a Batch API output line (no custom_id)"),
])
def test_a_batch_output_line_of_another_shape_is_named_by_file_and_line(concepts, tmp_path, capsys, changes, message):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(_completion_line("a" * 64)) + "\n" + json.dumps(_completion_line("b" * 64, **changes))
                       + "\n")
    status = main(batch_args(concepts, tmp_path / "out", "--from-batch-output", results, "--batch-file",
                             tmp_path / "next.jsonl"))
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"diffembed reasonaug: error: {results} {message}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "next.jsonl").exists()


@pytest.mark.parametrize("second", [dict(), dict(error={"code": "server_error"}, response=None)])
def test_a_custom_id_on_two_lines_of_a_batch_output_is_refused(concepts, tmp_path, capsys, second):
    """Two answers to one request: which one a user meant is not ours to guess (the last one won silently)."""
    results = tmp_path / "results.jsonl"
    lines = [_completion_line("a" * 64), _completion_line("b" * 64), {**_completion_line("a" * 64), **second}]
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    status = main(batch_args(concepts, tmp_path / "out", "--from-batch-output", results, "--batch-file",
                             tmp_path / "next.jsonl"))
    err = capsys.readouterr().err
    assert status == 1 and err.strip() == (f"diffembed reasonaug: error: {results} line 3: custom_id {'a' * 64} is on "
                                           f"{results} line 1 too; a batch output holds one line per request: give "
                                           "each batch's output file to a run of its own")
    assert not (tmp_path / "out").exists()


def test_a_batch_output_that_is_not_utf8_is_named_by_file_line_and_byte(concepts, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    data = (json.dumps(_completion_line("a" * 64)) + "\n").encode() + b'{"custom_id": "k", "error": "caf\xe9"}\n'
    results.write_bytes(data)
    status = main(batch_args(concepts, tmp_path / "out", "--from-batch-output", results, "--batch-file",
                             tmp_path / "next.jsonl"))
    err = capsys.readouterr().err
    assert status == 1 and err.strip() == (f"diffembed reasonaug: error: {results} line 2: not UTF-8 (byte 0xe9 at "
                                           f"byte offset {data.index(0xe9)}); save the file as UTF-8")


LATIN_YAML = b"domains:\n  law:\n    question_type: legal\n    concepts: [Estoppel, Caf\xe9 Rule]\n"
LATIN_JSON = b'{"domains": {"law": {"question_type": "legal", "concepts": ["Caf\xe9"]}}}'
LAUGHS = ("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"  # "billion laughs", 5 levels deep (9 ** 5 lols)
          + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcd", "bcde"))
          + "domains: {x: {question_type: m, concepts: *e}}\n")


@pytest.mark.parametrize("name, data, message", [
    ("concepts.yaml", LATIN_YAML, f"line 4: not UTF-8 (byte 0xe9 at byte offset {LATIN_YAML.index(0xe9)}); save the "
     "file as UTF-8"),
    ("concepts.json", LATIN_JSON, f"line 1: not UTF-8 (byte 0xe9 at byte offset {LATIN_JSON.index(0xe9)})"),
    ("concepts.yaml", LAUGHS.encode(), "line 2: a YAML alias (*a); a concepts file cannot use aliases"),
    ("concepts.yaml", b"domains:\n  x: &x {question_type: math, concepts: [A, B]}\n  y: *x\n",
     "line 3: a YAML alias (*x); a concepts file cannot use aliases"),
    ("concepts.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply to be a concepts file"),
    ("concepts.yaml", b"\xef\xbb\xbfdomains:\n  x:\n    question_type: math\n    concepts: [A, B]\n", None),  # BOM
])
def test_concepts_files_that_cannot_be_read_are_named(tmp_path, capsys, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    if message is None:
        assert [d.concepts for d in load_concepts(path)] == [("A", "B")]
        return
    with pytest.raises(ConceptsError) as error:
        load_concepts(path)
    assert str(error.value).startswith(f"{path} {message}" if message.startswith("line") else f"{path}: {message}")
    status = main(["reasonaug", str(path), str(tmp_path / "out"), "--model", "m", "--base-url",
                   "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert status == 2 and err.strip() == f"diffembed reasonaug: error: {error.value}"
    assert not (tmp_path / "out").exists()


def test_prompts_files_that_cannot_be_read_are_named(tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_bytes(b"problem:\n  system: Caf\xe9\n")
    with pytest.raises(PromptsError, match=r"prompts.yaml line 2: not UTF-8 \(byte 0xe9 at byte offset 22\)"):
        load_prompts(prompts)
    prompts.write_text("topics:\n  coding: &t [a game]\n  other: *t\n")
    with pytest.raises(PromptsError, match=r"prompts.yaml line 3: a YAML alias \(\*t\); a prompts file cannot"):
        load_prompts(prompts)


# ----------------------------------------------------------------------------------------------------------------
# 7. Bad input: named before any work, one line, exit 2; nothing written
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("", "the concepts file is empty"),
    ("domains: {}\n", "name at least one"),
    ("domains:\n  algo:\n    question_type: coding\n    concepts: [Two Pointers, two  pointers]\n",
     "the concept 'two pointers' (domain 'algo') is listed twice: 'Two Pointers' (domain 'algo') is the same"),
    ("domains:\n  a:\n    question_type: coding\n    concepts: [Heap]\n  b:\n    question_type: math\n"
     "    concepts: [heap]\n", "'heap' (domain 'b') is listed twice: 'Heap' (domain 'a')"),
    ("domains:\n  a:\n    concepts: [Heap]\n", "domain 'a' needs a question_type"),
    ("domains:\n  a:\n    question_type: math\n    concepts: []\n", "concepts is empty"),
    ("domains:\n  a:\n    question_type: math\n    concept: [Heap]\n", "unknown key(s) ['concept']"),
    ("domains:\n  a:\n    question_type: math\n    concepts: [Heap, 3]\n", "item 2 is 3"),
    ("domains: [a, b\n", "not valid YAML"),
])
def test_bad_concepts_files_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "concepts.yaml"
    path.write_text(text)
    with pytest.raises(ConceptsError) as error:
        load_concepts(path)
    assert message in str(error.value) and str(path) in str(error.value)
    status = main(["reasonaug", str(path), str(tmp_path / "out"), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert status == 2 and err.strip() == f"diffembed reasonaug: error: {error.value}"
    assert not (tmp_path / "out").exists()


def test_json_concepts_and_prompt_overrides(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps({"domains": {"law": {"question_type": "legal", "concepts": ["Estoppel", "Laches"]}}}))
    assert [d.concepts for d in load_concepts(path)] == [("Estoppel", "Laches")]
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("problem:\n  other: 'A {question_type} case needing {concept}; code {x} and $\\frac{a}{b}$'\n")
    loaded, default = load_prompts(prompts), load_prompts()
    assert loaded.data["problem"]["coding"] == default.data["problem"]["coding"]  # the keys not given: defaults
    domain = load_concepts(path).domains[0]
    text = loaded.messages("problem", domain, concept="Estoppel", topic="t", reference="r")[1]["content"]
    assert text == "A legal case needing Estoppel; code {x} and $\\frac{a}{b}$"
    prompts.write_text("check:\n  other: 'Is it right?'\n")
    with pytest.raises(PromptsError, match=r"check.other must contain \{problem\}, \{solution\}"):
        load_prompts(prompts)
    prompts.write_text("checks:\n  other: x\n")
    with pytest.raises(PromptsError, match="unknown key 'checks'"):
        load_prompts(prompts)


@pytest.mark.parametrize("text, message", [
    ("definition:\n  other: 'Define the {domain} \"{concpet}\".'\n",
     "definition.other: {concpet} is not a field (did you mean {concept}?); it would reach the model as written. "
     "The fields of definition.other: {domain}, {question_type}, {concept}"),
    ("definition:\n  coding: 'Define {concept} in the setting of {topic}.'\n",
     "definition.coding: {topic} is not filled in there; it would reach the model as written. The fields of "
     "definition.coding: {domain}, {question_type}, {concept}"),
    ("check:\n  other: '{problem} {solution} Is it right for {reference}?'\n", "check.other: {reference} is not "
     "filled in there; it would reach the model as written. The fields of check.other: {domain}, {question_type}, "
     "{concept}, {problem}, {solution}"),
    ("problem:\n  other: 'A {question type} problem on {concept}.'\n",
     "problem.other: {question type} is not a field (did you mean {question_type}?)"),
    ("problem:\n  other: 'A problem on {Concept}.'\n", "problem.other: {Concept} is not a field (did you mean "
     "{concept}?)"),
    ("problem:\n  system: 'You write {domain} problems.'\n", "problem.system: {domain} is not filled in there; it "
     "would reach the model as written. The fields of problem.system: none (it is sent as written)"),
    ("instructions:\n  p2i: 'Given a problem, retrieve its {concept}'\n", "instructions.p2i: {concept} is not "
     "filled in there; it would reach the model as written. The fields of instructions.p2i: {domain}, {question_type}"),
    ("topics:\n  other: ['a {topics} setting']\n", "topics.other: {topics} is not a field (did you mean {topic}?)"),
])
def test_a_prompt_field_that_would_reach_the_model_as_written_is_refused(tmp_path, capsys, text, message):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(text)
    with pytest.raises(PromptsError) as error:
        load_prompts(prompts)
    assert str(error.value).startswith(f"{prompts}: {message}")
    concepts_path = tmp_path / "concepts.yaml"
    concepts_path.write_text(CONCEPTS)
    status = main(["reasonaug", str(concepts_path), str(tmp_path / "out"), "--model", "m", "--prompts", str(prompts),
                   "--base-url", "http://127.0.0.1:9/v1"])
    assert status == 2 and capsys.readouterr().err.strip() == f"diffembed reasonaug: error: {error.value}"
    assert not (tmp_path / "out").exists()


def test_code_and_latex_braces_and_the_default_prompts_pass_the_field_check(tmp_path):
    from diffembed_hf.reasonaug.prompts import _check, _default_data

    _check(_default_data(), "prompts.yaml")  # the package's own prompts
    _check(load_prompts(ROOT / "tests" / "engines" / "reasonaug_tiny_prompts.yaml").data, "tiny")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("problem:\n  other: |\n    A {question_type} case on {concept} in {topic}, as in {reference}.\n"
                       "    $\\begin{align} x_{i} &= \\frac{a}{b} \\text{cm} \\end{align}$ {selection} {option}\n"
                       "    ```python\n    d = {key: value for key in keys}\n    ```\n")
    loaded = load_prompts(prompts)
    assert "\\begin{align}" in loaded.data["problem"]["other"] and "{selection}" in loaded.data["problem"]["other"]


def test_request_fields_of_the_prompts_file_reach_the_server_as_given(concepts, tmp_path):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("request:\n  problem:\n    structured_outputs: {regex: 'x+'}\n    top_p: 0.5\n")
    loaded = load_prompts(prompts)
    with ChatServer(responder_for(concepts, loaded)) as chat_server:
        generate(concepts, tmp_path / "out", chat_server, prompts=prompts, problems_per_concept=1)
        bodies = [e["body"] for e in chat_server.log]
    problems = [b for b in bodies if b["messages"][0]["content"] == loaded.data["problem"]["system"]]
    assert problems and all(b["structured_outputs"] == {"regex": "x+"} and b["top_p"] == 0.5 for b in problems)
    assert not any("structured_outputs" in b for b in bodies if b not in problems)
    journal = {r["key"]: r for r in jsonl(tmp_path / "out" / "journal.jsonl")}
    assert {body_key(b) for b in bodies} == set(journal)  # the key is the body the server received
    prompts.write_text("request:\n  check:\n    seed: 3\n")
    with pytest.raises(PromptsError, match="request.check cannot set seed"):
        load_prompts(prompts)


def test_existing_outputs_are_never_replaced_without_overwrite(concepts, server, tmp_path, capsys):
    def run(*extra):
        status = main(["reasonaug", str(concepts), str(out), "--model", "test-model", "--base-url", server.url,
                       "--problems-per-concept", "2", *extra])
        return status, capsys.readouterr().err

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, err = run()
    assert status == 2 and "holds no ReasonAug run; pass --overwrite" in err
    shutil.rmtree(out)
    assert run()[0] == 0
    first = outputs(out)
    sent = len(server.log)
    status, err = run("--seed", "3")
    assert status == 2 and "other settings, prompts or concepts" in err and outputs(out) == first
    record = (out / "run.json").read_bytes()
    server.fail("500")  # --overwrite, but the new run fails: the old run's outputs and record stay as they were
    status, err = run("--seed", "3", "--overwrite", "--max-retries", "0")
    assert status == 1 and outputs(out) == first and (out / "run.json").read_bytes() == record
    server.faults.clear()
    status, err = run()  # the same run again: everything replayed, nothing sent, the same bytes
    assert status == 0 and outputs(out) == first and "this run sent 0" in err
    assert not [e for e in server.log[sent:] if e["answered"]]
    (tmp_path / "taken.jsonl").write_text("x")
    status, err = run("--batch-file", str(tmp_path / "taken.jsonl"))
    assert status == 2 and "exists; pass --overwrite" in err


def test_model_not_served_and_missing_key_are_named(concepts, server, tmp_path, capsys, monkeypatch):
    status = main(["reasonaug", str(concepts), str(tmp_path / "a"), "--model", "other", "--base-url", server.url])
    err = capsys.readouterr().err
    assert status == 1 and "does not serve the model 'other'; it serves: test-model" in err
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    status = main(["reasonaug", str(concepts), str(tmp_path / "b"), "--model", "gpt-4o-mini"])
    assert status == 2 and "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal, before any work
        main(["reasonaug", str(concepts), str(tmp_path / "c"), "--model", "m", "--workers", "0"])
    assert refused.value.code == 2 and "--workers: must be an integer >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# 8. diffembed train and diffembed evaluate --data on what reasonaug wrote, no hand editing
# ----------------------------------------------------------------------------------------------------------------


def test_train_and_evaluate_run_on_the_outputs_as_written(concepts, server, tiny_folders, tmp_path, capsys):
    from helpers.models import DREAM_SPECIAL_IDS

    out = tmp_path / "data"
    assert main(["reasonaug", str(concepts), str(out), "--model", "test-model", "--base-url", server.url,
                 "--problems-per-concept", "3", "--heldout-fraction", "0.2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"train\.jsonl: \d+ rows \(i2ps \d+, p2i \d+, p2ps \d+, ps2ps \d+", err)
    base = tiny_folders(name="base", weights="init", **DREAM_SPECIAL_IDS)
    assert main(["train", str(base), str(out / "train.jsonl"), str(tmp_path / "trained"), "--max-steps", "2",
                 "--batch-size", "4", "--max-seq-length", "64", "--eval-fraction", "0", "--device", "cpu"]) == 0
    assert main(["evaluate", str(tmp_path / "trained"), "--data", str(out / "heldout"), "--query-prompt", "",
                 "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "Localheldout" in json.dumps(summary)
