"""`diffembed evaluate` on stock mteb: exact metrics on a local BEIR set, BRIGHT-style exclusions, instruction
routing for every suite task, a cache that never mixes models, resume, and clear errors for bad input."""

import json
import os

import mteb
import numpy as np
import pytest
from datasets import Dataset
from helpers.evaluation import stored_results, stored_scores, write_beir
from sentence_transformers import SentenceTransformer
from torch.utils.data import DataLoader

from diffembed_hf.builtin_task import build_rows
from diffembed_hf.cli import main
from diffembed_hf.errors import OutputExistsError
from diffembed_hf.training_data import resolve_columns, to_training_rows
from diffembed_hf.evaluation import encoder as encoder_module
from diffembed_hf.evaluation.encoder import DiffEmbedEncoder
from diffembed_hf.heldout import evaluate_model, retrieval_task
from diffembed_hf.evaluation.run import evaluate
from diffembed_hf.evaluation.suites import SUITES

# Python's own documentation strings and code (nobody on this project wrote them): docstring summary -> function.
MODULES = ("json", "csv", "textwrap", "heapq", "shlex", "glob", "fnmatch", "copy", "bisect", "base64", "string",
           "gzip", "zipfile", "shutil", "tempfile", "codecs", "locale", "operator")


@pytest.fixture(scope="module")
def models(tiny_folders):
    """Two tiny folders (real Dream tokenizer, initialised as a base model is), a and b."""
    return tuple(str(tiny_folders(name=name, seed=seed, weights="init")) for name, seed in (("a", 0), ("b", 1)))


@pytest.fixture(scope="module")
def heldout_rows():
    """Held-out rows exactly as training loads them: anchors carry their instruction, documents nothing."""
    raw = Dataset.from_list(build_rows(MODULES)[:80])
    columns, _ = to_training_rows(raw, "rows", resolve_columns(raw, "rows"))
    return Dataset.from_dict(columns)


@pytest.fixture(scope="module")
def beir(heldout_rows, tmp_path_factory):
    queries, corpus, relevant = retrieval_task(heldout_rows)
    return write_beir(tmp_path_factory.mktemp("beir") / "stdlib-docs", corpus, queries, relevant), \
        (queries, corpus, relevant)


REAL_EMBED = encoder_module._embed


class Recorder:
    """Wraps the encoding seam: records (texts, prompt, embeddings) of every call; can fail on demand."""

    def __init__(self, monkeypatch, fail_on=None):
        self.calls, self.fail_on = [], fail_on

        def spy(model, texts, prompt, max_tokens_per_batch, **kwargs):
            if self.fail_on and self.fail_on(texts):
                raise RuntimeError("killed")
            embeddings = REAL_EMBED(model, texts, prompt, max_tokens_per_batch, **kwargs)
            self.calls.append((list(texts), prompt, embeddings))
            return embeddings

        monkeypatch.setattr(encoder_module, "_embed", spy)

    def embeddings_for(self, texts):
        return next(e for t, _, e in self.calls if t == list(texts))


def ranking_metrics(q_emb, d_emb, qids, dids, qrels, excluded=None):
    """Exact nDCG@10, MRR@10 and recall@k from embeddings: cosine, full sort, binary relevance."""
    scores = (q_emb.astype(np.float64) / np.linalg.norm(q_emb, axis=1, keepdims=True)) @ \
        (d_emb.astype(np.float64) / np.linalg.norm(d_emb, axis=1, keepdims=True)).T
    out = {"ndcg_at_10": [], "mrr_at_10": [], "recall_at_1": [], "recall_at_5": [], "recall_at_10": []}
    for i, qid in enumerate(qids):
        order = [dids[j] for j in np.argsort(-scores[i], kind="stable")
                 if dids[j] not in (excluded or {}).get(qid, ())]
        relevant = qrels[qid]
        gains = [1.0 if d in relevant else 0.0 for d in order[:10]]
        dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains))
        ideal = sum(1 / np.log2(r + 2) for r in range(min(len(relevant), 10)))
        out["ndcg_at_10"].append(dcg / ideal)
        first = next((r for r, d in enumerate(order[:10]) if d in relevant), None)
        out["mrr_at_10"].append(0.0 if first is None else 1 / (first + 1))
        for k in (1, 5, 10):
            out[f"recall_at_{k}"].append(len(set(order[:k]) & relevant) / len(relevant))
    return {k: float(np.mean(v)) for k, v in out.items()}


def assert_same_metrics(summary, expected):
    """mteb reports nDCG / recall to 5 decimals (round(x, 5) in mteb's retrieval_metrics), MRR unrounded."""
    for name, value in expected.items():
        if name.startswith("mrr"):
            assert summary[name] == pytest.approx(value, abs=1e-6), name
        else:
            assert summary[name] == pytest.approx(round(value, 5), abs=1e-9), name


def test_local_beir_metrics_equal_exact_ranking_and_the_training_evaluator(models, beir, heldout_rows, tmp_path,
                                                                           monkeypatch, capsys):
    folder, (queries, corpus, relevant) = beir
    recorder = Recorder(monkeypatch)
    out = tmp_path / "eval"
    assert main(["evaluate", models[0], "--data", folder, "--output", str(out), "--query-prompt", ""]) == 0
    summary = stored_scores(out, "Localstdlib-docs")
    assert summary["metric"] == "ndcg_at_10" and summary["main_score"] == summary["ndcg_at_10"]

    # the same embeddings mteb ranked with, scored by exact code here
    qids, dids = list(queries), list(corpus)
    q_emb = recorder.embeddings_for(queries.values())
    d_emb = recorder.embeddings_for(corpus.values())
    expected = ranking_metrics(q_emb, d_emb, qids, dids, relevant)
    assert_same_metrics(summary, expected)
    assert 0 < expected["ndcg_at_10"] < 1 and 0 < expected["recall_at_10"] < 1  # a ranking, neither empty nor perfect

    # ... and those embeddings are the model's own: queries as given, documents bare
    st = SentenceTransformer(models[0], trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(q_emb, st.encode(list(queries.values())), atol=1e-5)
    np.testing.assert_allclose(d_emb, st.encode(list(corpus.values())), atol=1e-5)

    # the project's training-time evaluator (sentence-transformers' InformationRetrievalEvaluator), same split
    heldout = evaluate_model(st, heldout_rows)
    for ours, theirs in (("ndcg_at_10", "ndcg@10"), ("recall_at_1", "recall@1"), ("recall_at_5", "recall@5"),
                         ("recall_at_10", "recall@10"), ("mrr_at_10", "mrr@10")):
        assert_same_metrics(summary, {ours: heldout[theirs]})
    table = capsys.readouterr().out
    assert "Localstdlib-docs" in table and f"{100 * summary['ndcg_at_10']:.2f}" in table

    # mteb's own result file sits under the output, under this model's identity
    record = json.loads((out / "run.json").read_text())
    result_file = out / record["tasks"]["Localstdlib-docs"]["result_file"]
    assert json.loads(result_file.read_text())["scores"]["test"][0]["ndcg_at_10"] == summary["ndcg_at_10"]
    assert record["tasks"]["Localstdlib-docs"]["prompts_sent"] == {"query": "", "document": ""}

    # control: with the model's query prompt the queries change, and so do the scores
    assert main(["evaluate", models[0], "--data", folder, "--output", str(tmp_path / "eval2")]) == 0
    prompted = stored_scores(tmp_path / "eval2", "Localstdlib-docs")
    assert prompted["ndcg_at_10"] != summary["ndcg_at_10"]
    query_prompt = st.prompts["query"]
    assert recorder.calls[-2][1] == query_prompt and recorder.calls[-1][1] == ""  # queries, then the corpus


def test_excluded_ids_are_never_ranked_and_raise_the_score(models, beir, tmp_path, monkeypatch):
    _, (queries, corpus, relevant) = beir
    titles = {d: f"section {i}" for i, d in enumerate(list(corpus)[:10])}  # BEIR titles: "title text" for mteb
    plain = write_beir(tmp_path / "plain", corpus, queries, relevant, titles=titles)
    recorder = Recorder(monkeypatch)
    base = evaluate(models[0], data=plain, output=tmp_path / "out-plain", query_prompt="").summary["Localplain"]
    qids, dids = list(queries), list(corpus)
    q_emb = recorder.embeddings_for(queries.values())
    d_emb = recorder.embeddings_for([f"{titles[d]} {corpus[d]}" if d in titles else corpus[d] for d in dids])
    assert_same_metrics(base, ranking_metrics(q_emb, d_emb, qids, dids, relevant))

    # a query whose relevant document ranks 2nd..10th behind a non-relevant one: exclude that first document
    scores = q_emb @ d_emb.T
    target = next(qid for i, qid in enumerate(qids)
                  if 1 <= [dids[j] for j in np.argsort(-scores[i])].index(next(iter(relevant[qid]))) <= 9)
    top = dids[int(np.argmax(scores[qids.index(target)]))]
    assert top not in relevant[target]
    excluded = {target: {top}}
    bright = write_beir(tmp_path / "bright", corpus, queries, relevant, excluded=excluded, titles=titles)
    result = evaluate(models[0], data=bright, output=tmp_path / "out-bright", query_prompt="").summary["Localbright"]
    assert_same_metrics(result, ranking_metrics(q_emb, d_emb, qids, dids, relevant, excluded))
    assert result["ndcg_at_10"] > base["ndcg_at_10"] and result["mrr_at_10"] > base["mrr_at_10"]

    from diffembed_hf.evaluation.local import beir_task

    task = beir_task(bright)
    task.load_data()
    assert top not in task.top_ranked["test"][target] and len(task.top_ranked["test"][target]) == len(dids) - 1
    assert all(len(ids) == len(dids) for q, ids in task.top_ranked["test"].items() if q != target)


# docs/design/evaluation.md: the study's instructions, typo included; STS tasks share one; the rest are mteb's defaults.
STUDY = {
    "BrightTheoremQATheoremsRetrieval":
        "Given a problem, retrieve the relevant theorems that help solve the given problem:",
    "BrightTheoremQAQuestionsRetrieval":
        "Given a problem, retrieve the relevant problems that can be solved by the similar theorems:",
    "BrightAopsRetrieval":
        "Given a problem, rretrieve the relevant problems that can be solved by the similar math theorems:",
    "BrightLeetcodeRetrieval": "Given a coding problem, retrieve the relevant problems that can be solved by the "
                               "similar algorithms or data structures:",
    "SICK-R": "Retrieve semantically similar text:", "STS17": "Retrieve semantically similar text:",
    "STSBenchmark": "Retrieve semantically similar text:",
}
SYMMETRIC = {"STS", "Clustering", "Classification", "PairClassification"}


def test_every_suite_task_routes_the_study_instruction_to_queries_only(monkeypatch):
    sent = []
    monkeypatch.setattr(encoder_module, "_embed", lambda model, texts, prompt, budget, **kwargs: sent.append(
        [prompt + t for t in texts]) or np.ones((len(texts), 4), dtype=np.float32))
    encoder = DiffEmbedEncoder(None, None)
    names = sorted({task.name for tasks in SUITES.values() for task in tasks})
    assert len(names) == 4 + 8 + 6 + 3 + 15
    texts = DataLoader(Dataset.from_dict({"text": ["alpha beta", "gamma"]}), batch_size=1)
    for name in names:
        task = mteb.get_task(name)  # metadata only: no data, no network
        metadata = task.metadata
        if name in STUDY:
            instruction = STUDY[name]
        else:
            prompt = metadata.prompt
            instruction = (prompt.get("query") if isinstance(prompt, dict) else prompt) or type(task).abstask_prompt
        expected = instruction.strip().rstrip(":") + ":\n"
        for prompt_type in (mteb.types.PromptType.query, mteb.types.PromptType.document, None):
            sent.clear()
            encoder._cache.clear()
            encoder.encode(texts, task_metadata=metadata, hf_split="test", hf_subset="default",
                           prompt_type=prompt_type)
            on_documents = metadata.type in SYMMETRIC
            want = "" if prompt_type == mteb.types.PromptType.document and not on_documents else expected
            assert sent == [[want + "alpha beta", want + "gamma"]], (name, prompt_type)
    aops = STUDY["BrightAopsRetrieval"].rstrip(":") + ":\n"
    assert encoder.used["BrightAopsRetrieval"] == {"query": aops, "document": "", "input": aops}

    # a user's instruction file replaces the study's for the tasks it names, on the same sides
    custom = DiffEmbedEncoder(None, None, instructions={"ArguAna": "Find the counter-argument"})
    for name, prompt_type, want in (("ArguAna", mteb.types.PromptType.query, "Find the counter-argument:\n"),
                                    ("ArguAna", mteb.types.PromptType.document, ""),
                                    ("SciFact", mteb.types.PromptType.query, expected_of("SciFact"))):
        sent.clear()
        custom.encode(texts, task_metadata=mteb.get_task(name).metadata, hf_split="test", hf_subset="default",
                      prompt_type=prompt_type)
        assert sent == [[want + "alpha beta", want + "gamma"]]
    assert custom.routing(mteb.get_task("ArguAna").metadata)["source"] == "instruction file"


def expected_of(name):
    prompt = mteb.get_task(name).metadata.prompt
    return (prompt.get("query") if isinstance(prompt, dict) else prompt).rstrip(":") + ":\n"


def test_instruction_file_overrides_and_is_recorded(models, beir, tmp_path, monkeypatch):
    folder, _ = beir
    recorder = Recorder(monkeypatch)
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps({"SciFact": "x"}))
    assert main(["evaluate", models[0], "--data", folder, "--output", str(tmp_path / "o"),
                 "--instructions", str(instructions)]) == 2  # names a task that is not evaluated
    assert not recorder.calls


def test_two_models_into_one_output_never_share_results(models, beir, tmp_path, monkeypatch):
    folder, _ = beir
    out = tmp_path / "eval"
    first = evaluate(models[0], data=folder, output=out).summary
    with pytest.raises(OutputExistsError, match="holds the results of .*/a .*not of .*/b "):
        evaluate(models[1], data=folder, output=out)  # another model's results: refused, not mixed in
    assert stored_scores(out, "Localstdlib-docs") == first["Localstdlib-docs"]
    second = evaluate(models[1], data=folder, output=out, overwrite=True).summary  # replaces them
    assert first["Localstdlib-docs"]["ndcg_at_10"] != second["Localstdlib-docs"]["ndcg_at_10"]
    assert len(list((out / "results").iterdir())) == 1  # only this model's mteb files are left
    recorder = Recorder(monkeypatch)
    again = evaluate(models[1], data=folder, output=out).summary  # from mteb's cache: nothing encoded
    assert again == second and recorder.calls == []
    fresh = evaluate(models[1], data=folder, output=out, overwrite=True).summary  # recomputed, same numbers
    assert len(recorder.calls) == 2 and fresh == second


def test_shared_corpus_is_encoded_once_and_an_interrupted_run_resumes(models, beir, tmp_path, monkeypatch):
    _, (queries, corpus, relevant) = beir
    qids = list(queries)
    half = {q: queries[q] for q in qids[:40]}, {q: queries[q] for q in qids[40:]}
    a = write_beir(tmp_path / "a", corpus, half[0], {q: relevant[q] for q in half[0]})
    b = write_beir(tmp_path / "b", corpus, half[1], {q: relevant[q] for q in half[1]})
    out = tmp_path / "eval"

    # killed while encoding task b's queries: nothing in the output; task a's result kept for the rerun
    Recorder(monkeypatch, fail_on=lambda texts: list(texts) == list(half[1].values()))
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(models[0], data=[a, b], output=out)
    assert not out.exists()
    assert [p.name for p in (tmp_path / ".eval.partial").rglob("Local*.json")] == ["Locala.json"]

    recorder = Recorder(monkeypatch)
    result = evaluate(models[0], data=[a, b], output=out)
    assert set(result.summary) == {"Locala", "Localb"} and not (tmp_path / ".eval.partial").exists()
    encoded = [texts for texts, _, _ in recorder.calls]
    assert list(half[0].values()) not in encoded  # task a came from the interrupted run's results
    assert encoded == [list(half[1].values()), list(corpus.values())]

    # both tasks in one fresh run: the corpus they share is embedded once
    recorder.calls.clear()
    evaluate(models[0], data=[a, b], output=tmp_path / "eval-2")
    assert [texts for texts, _, _ in recorder.calls].count(list(corpus.values())) == 1
    assert len(recorder.calls) == 3


def error_of(capsys, argv, status=2):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status and err.startswith("diffembed evaluate: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err


def test_bad_input_is_named_and_leaves_nothing_behind(models, beir, tmp_path, capsys):
    folder, (queries, corpus, relevant) = beir
    out = tmp_path / "eval"
    assert "bright" in error_of(capsys, ["evaluate", models[0], "--suite", "brigth", "--output", str(out)])
    assert "ArguAna" in error_of(capsys, ["evaluate", models[0], "--tasks", "ArguAnna", "--output", str(out)])

    missing = tmp_path / "missing"
    write_beir(missing, corpus, queries, relevant)
    (missing / "qrels" / "test.tsv").unlink()
    assert str(missing / "qrels" / "test.tsv") in error_of(
        capsys, ["evaluate", models[0], "--data", str(missing), "--output", str(out)])

    unknown = tmp_path / "unknown"
    write_beir(unknown, corpus, queries, relevant)
    lines = (unknown / "qrels" / "test.tsv").read_text().splitlines()
    lines[2] = lines[2].split("\t")[0] + "\tno-such-doc\t1"
    (unknown / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    err = error_of(capsys, ["evaluate", models[0], "--data", str(unknown), "--output", str(out)])
    assert f"{unknown / 'qrels' / 'test.tsv'} line 3" in err and "'no-such-doc'" in err

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    err = error_of(capsys, ["evaluate", models[0], "--tasks", "SciFact", "--output", str(out)])
    assert "SciFact needs its dataset mteb/scifact from the Hugging Face Hub" in err and "--data" in err

    other = tmp_path / "not-results"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "holds no evaluation results" in error_of(
        capsys, ["evaluate", models[0], "--data", folder, "--output", str(other)])
    assert [p.name for p in tmp_path.iterdir()] and not out.exists()
    assert not any(p.name.startswith(".eval") for p in tmp_path.iterdir())  # no staging left either
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_without_mteb_the_command_names_the_extra(models, beir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mteb", None)
    # a missing extra is a failure of the installation (1), as for train, not a usage error (2)
    err = error_of(capsys, ["evaluate", models[0], "--data", beir[0], "--output", str(tmp_path / "o")], status=1)
    assert "pip install 'diffembed-hf[eval]'" in err


def test_a_second_run_into_the_same_output_keeps_the_first_runs_tasks(models, beir, tmp_path):
    """MODEL/eval after a second suite still lists the first one (push puts summary.json on the card); another
    model's run into the same folder is refused and changes nothing (control)."""
    _, (queries, corpus, relevant) = beir
    qids = list(queries)
    half = {q: queries[q] for q in qids[:40]}, {q: queries[q] for q in qids[40:]}
    a = write_beir(tmp_path / "a", corpus, half[0], {q: relevant[q] for q in half[0]})
    b = write_beir(tmp_path / "b", corpus, half[1], {q: relevant[q] for q in half[1]})
    out = tmp_path / "eval"
    evaluate(models[0], data=[a], output=out)
    evaluate(models[0], data=[b], output=out)
    assert [r["task"] for r in stored_results(out)] == ["Locala", "Localb"]
    assert set(json.loads((out / "run.json").read_text())["tasks"]) == {"Localb"}  # run.json: the latest run
    before = (out / "summary.json").read_text()
    with pytest.raises(OutputExistsError):
        evaluate(models[1], data=[b], output=out)
    assert (out / "summary.json").read_text() == before
