"""Evaluation results that cannot get lost or mixed up (issue 17, "never keep a corrupt, stale or foreign result"):
one run at a time per output, a killed run resumed, every settings group of a model kept in summary.json, results
carrying the identity of the model that made them, a card showing only its own model's results, and options that
would be ignored refused."""

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset
from helpers.evaluation import card_with_results, write_beir
from helpers.processes import clean_env
from huggingface_hub import ModelCard

from diffembed_hf.builtin_task import build_rows
from diffembed_hf.cli import main
from diffembed_hf.training_data import resolve_columns, to_training_rows
from diffembed_hf.evaluation import encoder as encoder_module
from diffembed_hf.heldout import retrieval_task
from diffembed_hf.evaluation.run import evaluate

REAL_EMBED = encoder_module._embed


@pytest.fixture(scope="module")
def models(tiny_folders):
    """Two tiny folders (real Dream tokenizer, initialised as a base model is), a and b."""
    return tuple(str(tiny_folders(name=name, seed=seed, weights="init")) for name, seed in (("a", 0), ("b", 1)))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two local BEIR sets over one corpus (Python's own docstrings -> functions), 12 queries each."""
    raw = Dataset.from_list(build_rows(("json", "csv", "textwrap", "heapq", "shlex", "glob"))[:40])
    columns, _ = to_training_rows(raw, "rows", resolve_columns(raw, "rows"))
    queries, corpus, relevant = retrieval_task(Dataset.from_dict(columns))
    qids = list(queries)[:24]
    root = tmp_path_factory.mktemp("beir")
    halves = qids[:12], qids[12:]
    a, b = (write_beir(root / name, corpus, {q: queries[q] for q in half}, {q: relevant[q] for q in half})
            for name, half in zip(("a", "b"), halves))
    return a, b, [queries[q] for q in halves[1]], list(corpus.values())


class Recorder:
    """Wraps the encoding seam and records the texts of every call."""

    def __init__(self, monkeypatch):
        self.calls = []

        def spy(model, texts, prompt, max_tokens_per_batch, **kwargs):
            self.calls.append(list(texts))
            return REAL_EMBED(model, texts, prompt, max_tokens_per_batch, **kwargs)

        monkeypatch.setattr(encoder_module, "_embed", spy)


# A `diffembed evaluate` process that stops before it encodes the queries of the second task (the first task's
# result file is written by then) and says so on stdout; it goes on when a line arrives on stdin.
PAUSED_EVALUATE = r"""
import sys
from diffembed_hf.evaluation import encoder

real, pause_on = encoder._embed, sys.argv[1]

def paused(model, texts, prompt, budget, **kwargs):
    if pause_on in texts:
        print("paused", flush=True)
        sys.stdin.readline()
    return real(model, texts, prompt, budget, **kwargs)

encoder._embed = paused
from diffembed_hf.cli import main

sys.argv = ["diffembed", *sys.argv[2:]]
sys.exit(main(sys.argv[1:]))
"""


def start_paused(argv, pause_on, log):
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EVALUATE, pause_on, *argv], env=clean_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            start_new_session=True)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 600
        line = ""
        while line != "paused\n":
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"the evaluate process never reached the pause:\n{log.read_text()[-3000:]}")
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the evaluate process ended before the pause:\n{log.read_text()[-3000:]}")
    return proc


def error_of(capsys, argv, status=2):
    capsys.readouterr()  # what earlier steps logged
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status and err.startswith("diffembed evaluate: error: "), err
    assert len(err.strip().splitlines()) == 1
    return err


def test_a_second_evaluate_into_the_same_output_is_refused_naming_the_first(models, sets, tmp_path, monkeypatch,
                                                                           capsys):
    a, b, pause_on, corpus = sets
    out = tmp_path / "eval"
    argv = ["evaluate", models[0], "--data", a, "--data", b, "--output", str(out)]
    holder = start_paused(argv, pause_on[0], tmp_path / "holder.log")
    try:
        recorder = Recorder(monkeypatch)
        err = error_of(capsys, ["evaluate", models[1], "--data", a, "--output", str(out)])
        assert f"{out} is being written by another run (pid {holder.pid} " in err
        assert f"'diffembed evaluate {models[0]} --data {a} --data {b} --output {out}'" in err  # its command
        assert recorder.calls == [] and not out.exists()  # refused before any work; the holder's run untouched

        holder.stdin.write("go on\n")
        holder.stdin.flush()
        assert holder.wait(timeout=600) == 0, (tmp_path / "holder.log").read_text()[-3000:]
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["model"] == str(os.path.realpath(models[0]))
    assert [r["task"] for r in summary["results"]] == ["Locala", "Localb"]
    assert not (tmp_path / ".eval.lock").exists() and not (tmp_path / ".eval.partial").exists()
    # released: the next run goes ahead (and finds this model's results cached: nothing is encoded)
    assert main(["evaluate", models[0], "--data", a, "--output", str(out)]) == 0 and recorder.calls == []


@pytest.mark.slow  # a killed evaluation, its resume and a second model
def test_a_killed_evaluate_resumes_and_leaves_nothing_to_another_model(models, sets, tmp_path, monkeypatch, caplog):
    a, b, pause_on, corpus = sets
    out = tmp_path / "eval"
    holder = start_paused(["evaluate", models[0], "--data", a, "--data", b, "--output", str(out)], pause_on[0],
                          tmp_path / "holder.log")
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    partial, lock = tmp_path / ".eval.partial", tmp_path / ".eval.lock"
    assert not out.exists() and json.loads(lock.read_text())["pid"] == holder.pid  # the killed run's lock is left
    assert [p.name for p in partial.rglob("Local*.json")] == ["Locala.json"]
    left = shutil.copytree(partial, tmp_path / "left-by-the-killed-run")

    recorder = Recorder(monkeypatch)
    resumed = evaluate(models[0], data=[a, b], output=out)
    assert "Removing the stale lock" in caplog.text and not lock.exists() and not partial.exists()
    assert recorder.calls == [pause_on, corpus]  # task b only: task a's result came from the killed run
    uninterrupted = evaluate(models[0], data=[a, b], output=tmp_path / "uninterrupted")
    assert resumed.summary == uninterrupted.summary

    # the killed run's staging folder is model A's: a run of model B into that output starts afresh
    other = tmp_path / "other"
    shutil.copytree(left, tmp_path / ".other.partial")
    caplog.clear()
    evaluate(models[1], data=[a], output=other)
    assert "left by an interrupted run of" in caplog.text
    assert [p.name for p in (other / "results").iterdir()] == ["diffembed-local__b"]
    assert not list(other.rglob("Localb.json"))


def test_summary_keeps_every_settings_group_of_the_model(models, sets, tmp_path, monkeypatch, capsys):
    a = sets[0]
    out = tmp_path / "eval"
    assert main(["evaluate", models[0], "--data", a, "--output", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", models[0], "--data", a, "--output", str(out), "--query-prompt", ""]) == 0
    assert main(["evaluate", models[0], "--data", a, "--output", str(out), "--max-seq-length", "16"]) == 0
    table = capsys.readouterr().out
    rows = table.splitlines()
    header = max(i for i, line in enumerate(rows) if line.startswith("task"))  # the last run's table
    assert [row.split()[0] for row in rows[header + 1:header + 4]] == ["Locala"] * 3  # no result lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == 2 and summary["model"] == first["model"]
    results = summary["results"]
    assert [r["task"] for r in results] == ["Locala"] * 3
    assert results[0] == first["results"][0]  # the first run's result, unchanged
    model_prompt = results[0]["settings"]["query_prompt"]
    assert model_prompt.startswith("Given a web search query")
    assert [(r["settings"]["max_seq_length"], r["settings"]["query_prompt"]) for r in results] == [
        (64, model_prompt), (64, ""), (16, model_prompt)]
    scores = [r["scores"]["ndcg_at_10"] for r in results]
    assert len(set(scores)) == 3  # three settings, three different results
    # the printed table names each result's settings
    assert rows[header].split() == ["task", "settings", "metric", "ours", "study", "bytes/vector"]
    assert rows[header + 2].split()[1:-1] == ["64", "tokens,", "query", "prompt", "''", "ndcg_at_10",
                                              f"{100 * scores[1]:.2f}"]
    assert rows[header + 3].startswith("Locala  16 tokens, query prompt 'Given a web search query, …  ndcg_at_10")
    assert rows[header + 3].split()[-2] == f"{100 * scores[2]:.2f}"
    width = json.loads((Path(models[0]) / "config.json").read_text())["hidden_size"]
    assert {rows[header + k].split()[-1] for k in (1, 2, 3)} == {f"{4 * width:,}"}  # float32 bytes per vector

    # the same settings again replace their own result (from mteb's cache: nothing encoded), never add a fourth
    recorder = Recorder(monkeypatch)
    assert main(["evaluate", models[0], "--data", a, "--output", str(out), "--query-prompt", ""]) == 0
    def unstamped(results):
        return [{k: v for k, v in r.items() if k != "evaluated"} for r in results]

    assert recorder.calls == [] and unstamped(json.loads((out / "summary.json").read_text())["results"]) == unstamped(
        results)

    # the card lists all three, each with its settings; the model-index keeps them apart
    card = card_with_results(models[0], "me/a", out)
    assert "| task | settings | metric | this model | study |" in card.text
    assert f"| Locala | 64 tokens, query prompt '' | ndcg_at_10 | {100 * scores[1]:.2f} |  |" in card.text
    assert (f"| Locala | 16 tokens, query prompt 'Given a web search query, … | ndcg_at_10 | {100 * scores[2]:.2f} |  |"
            in card.text)
    entries = ModelCard(str(card)).data.eval_results
    assert sorted(e.metric_value for e in entries) == sorted(scores) and {e.dataset_name for e in entries} == {"Locala"}
    assert {e.metric_name for e in entries} == {"ndcg_at_10 (64 tokens, query prompt '')", "ndcg_at_10 (16 tokens, "
                                                "query prompt 'Given a web search query, …)", "ndcg_at_10 (64 tokens, "
                                                "query prompt 'Given a web search query, …)"}


def test_a_card_shows_only_its_own_models_results(models, sets, tmp_path, capsys, caplog):
    a = sets[0]
    model_a, model_b = (shutil.copytree(m, tmp_path / name) for m, name in zip(models, ("a", "b")))
    b_eval = model_b / "eval"
    assert main(["evaluate", str(model_a), "--data", a, "--output", str(b_eval)]) == 0
    capsys.readouterr()

    card = card_with_results(model_b, "me/b")
    assert "Benchmark results" not in card.text and not ModelCard(str(card)).data.eval_results
    assert f"{b_eval} holds the results of {model_a} " in caplog.text
    assert f"left off the card of {model_b}" in caplog.text
    # A's card with those results given explicitly shows them (control: the results themselves are fine)
    assert "| Locala | ndcg_at_10 |" in card_with_results(model_a, "me/a", b_eval).text

    # push B with A's results is refused, naming both
    code = main(["push", str(model_b), "me/b", "--dry-run", "--skip-validation", "--eval-results", str(b_eval)])
    err = capsys.readouterr().err
    assert code == 2 and f"holds the results of {model_a} " in err and f"not of {model_b} " in err

    # evaluating B into B/eval is refused while A's results are there; --overwrite replaces them
    err = error_of(capsys, ["evaluate", str(model_b), "--data", a, "--output", str(b_eval)])
    assert f"holds the results of {model_a} " in err and "--overwrite" in err
    assert main(["evaluate", str(model_b), "--data", a, "--output", str(b_eval), "--overwrite"]) == 0
    own = json.loads((b_eval / "summary.json").read_text())["results"][0]["scores"]["main_score"]
    assert f"| Locala | ndcg_at_10 | {100 * own:.2f} |" in card_with_results(model_b, "me/b").text


def test_a_models_identity_covers_what_changes_its_vectors_and_nothing_else(models, sets, tmp_path, monkeypatch,
                                                                            capsys):
    a = sets[0]
    model = shutil.copytree(models[0], tmp_path / "model")
    assert main(["evaluate", str(model), "--data", a, "--output", str(model / "eval")]) == 0
    first = json.loads((model / "eval" / "summary.json").read_text())

    # an export inside the folder (a full model copy in a subfolder, as `export vllm MODEL MODEL/vllm` would
    # write), an edited card and the eval/ folder itself: still the same model, whose results are reused
    export = model / "vllm"
    export.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json"):
        shutil.copy2(model / name, export / name)
    (model / "README.md").write_text("# my model\n\nNotes of my own.\n")
    recorder = Recorder(monkeypatch)
    assert main(["evaluate", str(model), "--data", a, "--output", str(model / "eval")]) == 0
    assert recorder.calls == []  # nothing recomputed: the folder is the model that made the results
    recorded = first["model"]
    assert json.loads((model / "eval" / "summary.json").read_text())["model"] == recorded
    assert "Benchmark results" in card_with_results(model, "me/model").text
    capsys.readouterr()

    from diffembed_hf.model_folder import model_identity

    assert model_identity(model).sha256 == recorded["model_sha256"]
    # a tokenizer edit changes the vectors: another model, whose card does not show the old results
    tokenizer_config = model / "tokenizer_config.json"
    original = tokenizer_config.read_bytes()
    config = json.loads(original)
    tokenizer_config.write_text(json.dumps({**config, "model_max_length": 77}))
    assert model_identity(model).sha256 != recorded["model_sha256"]
    assert "Benchmark results" not in card_with_results(model, "me/model").text
    err = error_of(capsys, ["evaluate", str(model), "--data", a, "--output", str(model / "eval")])
    assert "holds the results of" in err and recorded["model_sha256"][:12] in err
    tokenizer_config.write_bytes(original)
    assert model_identity(model).sha256 == recorded["model_sha256"]  # content, not time stamps

    # one weight changed
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name][0] += 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert model_identity(model).sha256 != recorded["model_sha256"]


def test_options_that_would_be_ignored_are_refused(models, sets, tmp_path, monkeypatch, capsys):
    a = sets[0]
    recorder = Recorder(monkeypatch)
    out = str(tmp_path / "eval")
    err = error_of(capsys, ["evaluate", models[0], "--suite", "stdlib", "--max-heldout", "20", "--query-prompt",
                            "Q: ", "--output", out])
    assert "--query-prompt" in err and "--data" in err
    err = error_of(capsys, ["evaluate", models[0], "--tasks", "SciFact", "--query-prompt", "Q: ", "--output", out])
    assert "--query-prompt" in err and "--instructions" in err
    err = error_of(capsys, ["evaluate", models[0], "--data", a, "--max-heldout", "5", "--output", out])
    assert "--max-heldout" in err and "--suite stdlib" in err
    err = error_of(capsys, ["evaluate", models[0], "--tasks", "SciFact", "--max-heldout", "5", "--output", out])
    assert "--max-heldout" in err
    assert recorder.calls == [] and not any(tmp_path.iterdir())  # refused before any work, nothing written


def test_a_damaged_or_old_summary_is_refused_and_overwrite_replaces_it(models, sets, tmp_path, capsys, caplog):
    a = sets[0]
    model = shutil.copytree(models[0], tmp_path / "model")
    out = model / "eval"
    out.mkdir()
    # summary.json as diffembed-hf wrote it before results named their model: whose results these are is unknown
    (out / "summary.json").write_text(json.dumps({"Locala": {"main_score": 0.9, "metric": "ndcg_at_10"}}))
    (out / "run.json").write_text(json.dumps({"mteb_version": "2.26.24", "max_seq_length": 64, "tasks": {}}))
    assert "Benchmark results" not in card_with_results(model, "me/model").text
    assert "unidentified model" in caplog.text
    err = error_of(capsys, ["evaluate", str(model), "--data", a, "--output", str(out)])
    assert "unidentified model" in err and "--overwrite" in err

    (out / "summary.json").write_text('{"format": "diffembed-evaluate-summary", "version": 2, "model"')  # cut short
    err = error_of(capsys, ["evaluate", str(model), "--data", a, "--output", str(out)])
    assert "summary.json cannot be read as JSON" in err and "--overwrite" in err
    assert main(["evaluate", str(model), "--data", a, "--output", str(out), "--overwrite"]) == 0  # the advice works
    assert [r["task"] for r in json.loads((out / "summary.json").read_text())["results"]] == ["Locala"]
