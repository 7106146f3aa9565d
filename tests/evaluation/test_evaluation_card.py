"""Evaluation results on the model card (model-index validated by huggingface_hub), and `--suite stdlib`
reproducing the demo's own held-out numbers."""

import json

import pytest
from helpers.evaluation import card_with_results, stored_scores
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from diffembed_hf.cli import main
from diffembed_hf.demo import run_demo
from diffembed_hf.errors import EvaluationError
from diffembed_hf.publish import prepare_push


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), max_steps=10, max_heldout=100, tiny=True)


def stdlib_scores(model_folder, out, capsys):
    assert main(["evaluate", str(model_folder), "--suite", "stdlib", "--max-heldout", "100", "--output", str(out)]) == 0
    assert "StdlibHeldOutRetrieval" in capsys.readouterr().out
    return stored_scores(out, "StdlibHeldOutRetrieval")


@pytest.mark.slow  # the whole demo first
def test_suite_stdlib_reproduces_the_demo_numbers(demo, tmp_path, capsys):
    tuned = stdlib_scores(demo.folder, tmp_path / "tuned", capsys)
    untrained = stdlib_scores(demo.folder.parent / "untrained", tmp_path / "untrained", capsys)
    # mteb reports nDCG and recall rounded to 5 decimals; MRR unrounded (to 6 in its files)
    for ours, metrics in ((tuned, demo.metrics["stdlib"]["fine-tuned"]),
                          (untrained, demo.metrics["stdlib"]["untrained"])):
        assert ours["ndcg_at_10"] == pytest.approx(round(metrics["ndcg@10"], 5), abs=1e-9)
        assert ours["recall_at_10"] == pytest.approx(round(metrics["recall@10"], 5), abs=1e-9)
        assert ours["mrr_at_10"] == pytest.approx(metrics["mrr@10"], abs=1e-6)
    # each equals its own demo number to 1e-9 while the two differ: the comparison can fail
    assert abs(tuned["ndcg_at_10"] - untrained["ndcg_at_10"]) > 1e-4
    record = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert record["max_seq_length"] == 128 and record["tasks"]["StdlibHeldOutRetrieval"]["routing"]["query"] == ""


def write_results(folder, model, summary, tasks):
    """A summary.json (format version 2) of `model`'s results, as `diffembed evaluate` writes it."""
    from diffembed_hf.model_folder import model_identity

    identity = model_identity(model)
    results = [{"task": task, "settings": {"max_seq_length": 4096, "query_prompt": "q", "document_prompt": ""},
                "settings_key": "0", "scores": scores, "mteb_version": "2.26.24", **tasks[task]}
               for task, scores in summary.items()]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"format": "diffembed-evaluate-summary", "version": 2, "model": {
        **identity.as_dict(), "key": identity.key}, "results": results}))
    return folder


@pytest.mark.slow  # the whole demo first (shared with the test above)
def test_model_card_lists_every_task_and_passes_huggingface_hub_validation(demo, tmp_path, capsys):
    # stored results of a real run, into MODEL/eval where push looks by default
    stdlib_scores(demo.folder, demo.folder / "eval", capsys)
    card = card_with_results(demo.folder, "me/diffembed-demo")
    stored = stored_scores(demo.folder / "eval", "StdlibHeldOutRetrieval")
    parsed = ModelCard(str(card))  # huggingface_hub parses and validates the metadata (eval_results need a name)
    [result] = parsed.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("ndcg_at_10", stored["main_score"],
                                                                               "test")
    assert f"| StdlibHeldOutRetrieval | ndcg_at_10 | {100 * stored['main_score']:.2f} |" in card.text

    # several suite tasks, one with splits and one with an English subset, from a results folder given to push
    summary = {
        "BrightAopsRetrieval": {"main_score": 0.1234, "metric": "ndcg_at_10", "ndcg_at_10": 0.1234},
        "LEMBPasskeyRetrieval": {"main_score": 0.5, "metric": "ndcg_at_1", "ndcg_at_1": 0.5, "splits": {
            "test_256": {"main_score": 1.0, "ndcg_at_1": 1.0}, "test_8192": {"main_score": 0.0, "ndcg_at_1": 0.0}}},
        "STS17": {"main_score": 0.8, "metric": "cosine_spearman", "cosine_spearman": 0.8},
    }
    tasks = {
        "BrightAopsRetrieval": {"type": "Retrieval", "dataset": "mteb/BRIGHT", "dataset_revision": "c267",
                                "splits": ["standard"], "subsets": ["default"]},
        "LEMBPasskeyRetrieval": {"type": "Retrieval", "dataset": "mteb/LEMBPasskeyRetrieval", "dataset_revision":
                                 "86ac", "splits": ["test_256", "test_8192"], "subsets": ["default"]},
        "STS17": {"type": "STS", "dataset": "mteb/sts17-crosslingual-sts", "dataset_revision": "faeb",
                  "splits": ["test"], "subsets": ["en-en"]},
    }
    other = write_results(tmp_path / "suite-results", demo.folder, summary, tasks)
    card = card_with_results(demo.folder, "me/diffembed-demo", other)
    results = ModelCard(str(card)).data.eval_results
    got = {(r.dataset_name, r.dataset_split, r.dataset_config): (r.task_type, r.dataset_type, r.metric_type,
                                                                  r.metric_value, r.dataset_revision) for r in results}
    assert got == {
        ("BrightAopsRetrieval", "standard", "default"): ("text-retrieval", "mteb/BRIGHT", "ndcg_at_10", 0.1234, "c267"),
        ("LEMBPasskeyRetrieval", "test_256", "default"): ("text-retrieval", "mteb/LEMBPasskeyRetrieval", "ndcg_at_1",
                                                          1.0, "86ac"),
        ("LEMBPasskeyRetrieval", "test_8192", "default"): ("text-retrieval", "mteb/LEMBPasskeyRetrieval",
                                                           "ndcg_at_1", 0.0, "86ac"),
        ("STS17 (en-en)", "test", "en-en"): ("sentence-similarity", "mteb/sts17-crosslingual-sts", "cosine_spearman",
                                             0.8, "faeb"),
    }
    # the model-index survives huggingface_hub's own round trip
    name, again = model_index_to_eval_results(eval_results_to_model_index("diffembed-demo", results))
    assert name == "diffembed-demo" and again == results and all(isinstance(r, EvalResult) for r in again)
    # the table: ours beside the study's published numbers (docs/design/evaluation.md), every task
    assert "| BrightAopsRetrieval | ndcg_at_10 | 12.34 | 15.40 |" in card.text
    assert "| LEMBPasskeyRetrieval | Acc@1 <=4k | 100.00 | 100.00 |" in card.text
    assert "| LEMBPasskeyRetrieval | Acc@1 >4k | 0.00 | 29.30 |" in card.text
    assert "| STS17 | cosine_spearman | 80.00 | 87.83 |" in card.text

    with pytest.raises(EvaluationError, match="no readable evaluation results"):
        card_with_results(demo.folder, "me/diffembed-demo", tmp_path / "nothing-here")

    # push's --eval-results DIR puts those results on the card it stages for upload (and --dry-run lists it)
    with prepare_push(demo.folder, "me/diffembed-demo", validate=False, eval_results=other) as plan:
        staged = ModelCard.load(plan.staging / "README.md")
    assert {r.dataset_name for r in staged.data.eval_results} == {"BrightAopsRetrieval", "LEMBPasskeyRetrieval",
                                                                 "STS17 (en-en)"}
    assert main(["push", str(demo.folder), "me/diffembed-demo", "--dry-run", "--skip-validation",
                 "--eval-results", str(other)]) == 0
