"""Contrastive fine-tuning: it learns, it writes a reloadable Hub-ready folder, and bad data is refused early."""

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from diffembed_hf.builtin_task import HELD_OUT_MODULES, TRAIN_MODULES, build_rows
from diffembed_hf.training_data import DataError, load_training_data
from diffembed_hf.heldout import evaluate_bm25
from diffembed_hf.train import TrainingConfig, train

TRAINING_RECORD = "diffembed_training.json"  # written by `diffembed train` into the model folder

pytestmark = pytest.mark.versions  # CI reruns it on the oldest transformers / sentence-transformers

FAST = dict(batch_size=16, max_seq_length=64, warmup_steps=5, learning_rate=1e-3, save_steps=10**6,
            logging_steps=5, query_prompt="", gradient_checkpointing=True, bf16=False)  # the same numbers on any CPU


def word_overlap_rows(n, seed):
    """A task a model must learn: the positive holds the query's three words among five others, the hard
    negative only one of them. Words come from a real file (json's source), rows from a seeded generator."""
    import json as json_module

    words = sorted({w.strip(".,;:()").lower() for w in open(json_module.__file__).read().split()
                    if w.isalpha() and 3 < len(w) < 10})
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        query = rng.sample(words, 3)
        positive = query + rng.sample(words, 5)
        negative = [query[0]] + rng.sample(words, 7)
        rng.shuffle(positive), rng.shuffle(negative)
        rows.append({"query": " ".join(query), "positive": " ".join(positive), "negative": " ".join(negative)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base(tiny_folders):
    return str(tiny_folders(name="m", weights="init"))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    return write_jsonl(folder / "train.jsonl", word_overlap_rows(640, 0)), \
        write_jsonl(folder / "heldout.jsonl", word_overlap_rows(100, 1))


@pytest.fixture(scope="module")
def trained(base, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    return train(base, task[0], out, TrainingConfig(max_steps=40, lora=False, **FAST), eval_data=task[1])


def test_training_lowers_the_loss_and_raises_held_out_ndcg(trained):
    assert trained.losses[-1] < 0.6 * trained.losses[0]
    assert trained.metrics_after["ndcg@10"] > trained.metrics_before["ndcg@10"] + 0.01
    assert set(trained.metrics_after) == {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"}


def test_output_is_a_hub_ready_folder_with_training_metadata(trained):
    names = {p.name for p in trained.output_dir.iterdir()}
    assert {"config.json", "modeling_diffembed.py", "model.safetensors", "tokenizer.json", "modules.json",
            TRAINING_RECORD} <= names
    metadata = json.loads((trained.output_dir / TRAINING_RECORD).read_text())
    assert metadata["hyperparameters"]["max_steps"] == 40 and metadata["hyperparameters"]["scale"] == 50.0
    assert metadata["evaluation"]["metrics"] == pytest.approx(trained.metrics_after)
    assert not (trained.output_dir.parent / ".model.checkpoints").exists()  # removed on success


RELOAD = textwrap.dedent(
    """
    import sys, numpy as np
    sys.modules["diffembed_hf"] = None
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sys.argv[1], trust_remote_code=True)
    np.save(sys.argv[2], model.encode(sys.argv[3:]))
    """
)


@pytest.mark.slow  # a fresh-process load
def test_lora_run_merges_and_reloads_in_a_fresh_process(base, task, tmp_path):
    result = train(base, task[0], tmp_path / "lora", TrainingConfig(max_steps=12, lora=True, **FAST),
                   eval_data=task[1])
    from safetensors import safe_open

    with safe_open(str(result.output_dir / "model.safetensors"), "pt") as weights:
        assert not any("lora" in name for name in weights.keys())  # merged: plain DiffEmbed weights
    texts = ["alpha beta gamma", "some other words here"]
    subprocess.run([sys.executable, "-c", RELOAD, str(result.output_dir), str(tmp_path / "e.npy"), *texts],
                   check=True, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""), stdin=subprocess.DEVNULL,
                   timeout=300)
    from diffembed_hf.encoding import encode, load_encoder

    in_memory = encode(load_encoder(str(result.output_dir), device="cpu"), texts)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), in_memory, rtol=1e-5, atol=1e-5)
    base_vectors = encode(load_encoder(base, device="cpu"), texts)
    assert not np.allclose(in_memory, base_vectors, atol=1e-4)  # the merged LoRA changed the model


def test_adapter_only_output(base, task, tmp_path):
    result = train(base, task[0], tmp_path / "adapter",
                   TrainingConfig(max_steps=3, lora=True, adapter_only=True, eval_fraction=0.0, **FAST))
    names = {p.name for p in result.output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", TRAINING_RECORD} <= names
    assert "model.safetensors" not in names
    assert json.loads((result.output_dir / "adapter_config.json").read_text())["r"] == 16


def bad_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "empty"),
    ("cols.jsonl", '{"question_text": "q", "answer": "a"}\n', "no query column"),
    ("blank.jsonl", '{"query": "q1", "positive": "p"}\n{"query": "  ", "positive": "p"}\n',
     "row 2: the query in column 'query' is empty"),
    ("negs.jsonl", '{"query": "q", "positive": "p", "negatives": ["a", "b"]}\n'
                   '{"query": "r", "positive": "p", "negatives": ["a"]}\n', "row 2: 1 negatives, but row 1 has 2"),
    ("pos.csv", "query,positive\nq,\n", "row 1: the positive in column 'positive' is empty"),
])
def test_bad_data_is_refused_before_anything_is_written(base, tmp_path, name, content, message):
    data = bad_file(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as error:
        train(base, data, tmp_path / "out", TrainingConfig(max_steps=2, **FAST))
    assert name in str(error.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.checkpoints").exists()


def test_reasonaug_columns_are_recognised(tmp_path):
    row = {"id": 1, "domain": "math", "instance": "x", "task_type": "p2i",
           "task": "Given a problem, retrieve the relevant theorems", "user_query": "What is 2+2?",
           "positive_document": "Addition theorem", "hard_negative_document": "Pythagoras", "negative_instance": "y"}
    data = load_training_data(write_jsonl(tmp_path / "r.jsonl", [row, dict(row, user_query="What is 3+3?")]))
    first = data.train[0]
    assert first["anchor"] == "Given a problem, retrieve the relevant theorems:\nWhat is 2+2?"
    assert first["positive"] == "Addition theorem" and first["negative_1"] == "Pythagoras"
    assert data.train.column_names == ["anchor", "positive", "negative_1"]


def test_group_by_instruction_gives_one_dataset_per_instruction(tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}", "instruction": "A" if i % 2 else "B"} for i in range(6)]
    data = load_training_data(write_jsonl(tmp_path / "g.jsonl", rows), group_by_instruction=True)
    groups = list(data.train.values())
    assert len(groups) == 2 and sorted(len(g) for g in groups) == [3, 3]
    for group in groups:
        assert len({a.split(":\n")[0] for a in group["anchor"]}) == 1


def test_non_finite_loss_stops_training_and_writes_nothing(base, task, tmp_path):
    with pytest.raises(FloatingPointError, match="No model was written"):
        train(base, task[0], tmp_path / "nan",
              TrainingConfig(max_steps=5, lora=False, **dict(FAST, learning_rate=1e12)))
    assert not (tmp_path / "nan").exists()


def test_train_gives_the_callers_thread_count_back_returned_or_raised(base, task, tmp_path):
    """A CPU run sets torch's threads to the cores it may use; the caller's count comes back afterwards."""
    from transformers import TrainerCallback

    from diffembed_hf.device_settings import available_cores

    chosen = available_cores()
    control = chosen + 1  # a count the run would not pick: its return shows
    seen = []

    class RecordThreads(TrainerCallback):
        def on_step_begin(self, args, state, trainer_control, **kwargs):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(control)
    try:
        config = TrainingConfig(max_steps=1, lora=False, eval_fraction=0.0, **FAST)
        train(base, task[0], tmp_path / "ok", config, callbacks=[RecordThreads()])
        assert seen == [chosen]  # the run trained with its own count
        assert torch.get_num_threads() == control
        seen.clear()
        with pytest.raises(FloatingPointError, match="No model was written"):
            train(base, task[0], tmp_path / "nan", dataclasses.replace(config, max_steps=5, learning_rate=1e12),
                  callbacks=[RecordThreads()])
        assert seen and set(seen) == {chosen}
        assert torch.get_num_threads() == control
    finally:
        torch.set_num_threads(before)


def test_existing_output_is_refused(base, task, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        train(base, task[0], tmp_path / "taken", TrainingConfig(max_steps=1, **FAST))


def test_a_model_finished_meanwhile_is_never_replaced_without_overwrite(base, task, tmp_path, monkeypatch):
    """A second run into OUT that finishes between this run's check and its lock (issue 31): this one used to
    replace that model with exit 0; now it locks first, checks under the lock, and is refused."""
    import diffembed_hf.train as train_module
    from helpers.locks import run_before_the_lock

    from diffembed_hf.errors import OutputExistsError

    out, config = tmp_path / "out", TrainingConfig(max_steps=1, lora=False, eval_fraction=0.0, **FAST)
    other = run_before_the_lock(monkeypatch, train_module, lambda: train(base, task[0], out, config))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train(base, task[1], out, config)
    assert other[0].output_dir == out  # the other run finished, and its model is kept
    assert json.loads((out / TRAINING_RECORD).read_text())["datasets"] == [task[0]]


def test_config_file_rejects_unknown_settings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"max_steps": 7, "lora_rank": 8}')
    with pytest.raises(ValueError, match="lora_rank"):
        TrainingConfig.from_file(path)
    path.write_text('{"max_steps": 7}')
    assert TrainingConfig.from_file(path, batch_size=2).max_steps == 7


def test_builtin_task_rows_are_real_and_disjoint():
    train_rows, held_out = build_rows(TRAIN_MODULES[:6]), build_rows(HELD_OUT_MODULES[:2])
    assert len(train_rows) > 50 and len(held_out) > 50
    for row in train_rows[:50]:
        assert row["query"] not in row["positive"]  # the summary line never leaks into the document
        assert "def " in row["positive"] and row["negative"] != row["positive"]
    assert not {r["positive"] for r in train_rows} & {r["positive"] for r in held_out}


def test_bm25_baseline_scores_the_same_task(task):
    heldout = load_training_data(task[1], default_prompt="").train
    metrics = evaluate_bm25(heldout)
    assert 0.3 < metrics["ndcg@10"] <= 1.0  # three shared words make BM25 strong here


def test_gradcache_gives_the_same_first_step_as_the_plain_loss(base, task, tmp_path):
    """GradCache (cached multiple-negatives loss) computes the same loss in mini-batches: same first loss."""
    plain = train(base, task[0], tmp_path / "plain",
                  TrainingConfig(max_steps=2, lora=False, eval_fraction=0.0, **dict(FAST, logging_steps=1)))
    cached = train(base, task[0], tmp_path / "cached",
                   TrainingConfig(max_steps=2, lora=False, eval_fraction=0.0, gradcache_mini_batch_size=4,
                                  **dict(FAST, logging_steps=1)))
    assert cached.losses[0] == pytest.approx(plain.losses[0], rel=1e-4)
    assert (cached.output_dir / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------
# No result for work that did not happen; kill-safe checkpoints; the model card (issue 10)
# ----------------------------------------------------------------------------------------------------------


def test_a_run_that_cannot_form_a_batch_fails_and_writes_nothing(base, tmp_path):
    """All rows identical: the no-duplicates sampler yields no batch, so no step can run."""
    from diffembed_hf.train import TrainingError

    data = write_jsonl(tmp_path / "same.jsonl", [{"query": "the same question", "positive": "the same answer"}] * 40)
    with pytest.raises(TrainingError, match="ran no step.*duplicates"):
        train(base, data, tmp_path / "out", TrainingConfig(max_steps=3, lora=False, eval_fraction=0.0, **FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.jsonl"]  # no model, no checkpoints folder


def test_recorded_numbers_are_what_ran(trained):
    metadata = json.loads((trained.output_dir / TRAINING_RECORD).read_text())
    ran = metadata["training"]
    assert ran["steps"] == trained.steps == 40 and ran["samples"] == 40 * FAST["batch_size"]
    assert ran["epochs"] == pytest.approx(40 / (640 // FAST["batch_size"]))  # 640 rows (held-out rows from a file)
    assert ran["final_loss"] == trained.losses[-1] and ran["first_loss"] == trained.losses[0]


class _StopAt:
    """A trainer callback that interrupts the run (as Ctrl-C would) once `step` has run."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt

        return Stop()


@pytest.mark.slow  # four training runs, one killed
def test_resume_uses_only_a_complete_checkpoint_and_says_which(base, task, tmp_path, caplog):
    import shutil

    from diffembed_hf.train import CHECKPOINT_COMPLETE

    config = TrainingConfig(max_steps=4, lora=False, eval_fraction=0.0, **dict(FAST, save_steps=2))
    out, checkpoints = tmp_path / "out", tmp_path / ".out.checkpoints"
    with pytest.raises(KeyboardInterrupt):
        train(base, task[0], out, config, callbacks=[_StopAt(3)])
    assert (checkpoints / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file() and not out.exists()
    # A save of step 4 killed half-way: the folder is there, its weights cut short, no completion marker.
    half = checkpoints / "checkpoint-4"
    shutil.copytree(checkpoints / "checkpoint-2", half)
    (half / CHECKPOINT_COMPLETE).unlink()
    weights = half / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="diffembed_hf.train"):
        result = train(base, task[0], out, config, resume=True)
    assert result.resumed_from == str(checkpoints / "checkpoint-2") and result.steps == 4
    assert "Removing" in caplog.text and "checkpoint-4" in caplog.text
    assert f"Resuming from {checkpoints / 'checkpoint-2'}" in caplog.text
    assert json.loads((out / TRAINING_RECORD).read_text())["training"]["resumed_from_step"] == 2
    assert not checkpoints.exists()  # removed on success


def test_an_interrupted_run_leaves_no_empty_checkpoint_folder(base, task, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(base, task[0], tmp_path / "out", TrainingConfig(max_steps=4, lora=False, eval_fraction=0.0, **FAST),
              callbacks=[_StopAt(1)])
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_of_an_interrupted_run_are_kept_without_resume(base, task, tmp_path):
    from diffembed_hf.errors import OutputExistsError

    config = TrainingConfig(max_steps=4, lora=False, eval_fraction=0.0, **dict(FAST, save_steps=2))
    with pytest.raises(KeyboardInterrupt):
        train(base, task[0], tmp_path / "out", config, callbacks=[_StopAt(3)])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputExistsError, match="--resume"):
        train(base, task[0], tmp_path / "out", config)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_train_writes_the_model_card(trained):
    import yaml

    from diffembed_hf.model_card import is_generated_card

    card = (trained.output_dir / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "sentence-transformers" and "diffembed" in metadata["tags"]
    assert "| max_steps | 40 |" in card and "| scale | 50 |" in card  # hyper-parameters
    assert "Ran 40 optimizer steps (640 training pairs seen" in card  # what ran
    assert "## Evaluation" in card and f"| ndcg@10 | {trained.metrics_before['ndcg@10']:.6g} |" in card
    assert "SentenceTransformer(\"model\", trust_remote_code=True)" in card and "zhang-etal-2025-diffusion" in card
    assert is_generated_card(card) and not is_generated_card(card.replace("| max_steps | 40 |", "| max_steps | 41 |"))


# ----------------------------------------------------------------------------------------------------------
# Trust, round three (issue 31): an adapter means one base; a resume is the run it continues; every step trains
# ----------------------------------------------------------------------------------------------------------


def _tiny_base(tiny_folders, folder, seed):
    return tiny_folders.copy(folder, weights="init", seed=seed)


def test_an_adapter_means_one_base_wherever_it_is_used(tiny_folders, task, tmp_path, monkeypatch):
    """`train --adapter-only m-dream`: the adapter names its base by absolute path, so it embeds alike from a
    folder where "m-dream" is another model; its identity (corpus resume, evaluate's results and cache) covers its
    base, also for an adapter that names its base relatively (earlier versions wrote those)."""
    import shutil

    from diffembed_hf.model_folder import content_digest, model_identity
    from diffembed_hf.encoding import encode, load_encoder

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    _tiny_base(tiny_folders, here / "m-dream", seed=0), _tiny_base(tiny_folders, elsewhere / "m-dream", seed=1)
    monkeypatch.chdir(here)
    adapter = train("m-dream", task[0], tmp_path / "adapter", TrainingConfig(
        max_steps=2, lora=True, adapter_only=True, eval_fraction=0.0, **FAST)).output_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((here / "m-dream").resolve())
    texts = ["alpha beta gamma", "some other words here"]
    vectors = encode(load_encoder(str(adapter), device="cpu"), texts)
    identity = model_identity(adapter)
    legacy = Path(shutil.copytree(adapter, tmp_path / "legacy"))
    (legacy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "m-dream"}))
    legacy_here = content_digest(legacy)

    monkeypatch.chdir(elsewhere)  # where "m-dream" is another model
    np.testing.assert_allclose(encode(load_encoder(str(adapter), device="cpu"), texts), vectors, rtol=0, atol=1e-6)
    assert model_identity(adapter) == identity
    assert content_digest(legacy) != legacy_here  # the same adapter files on another base: another model
    shutil.copy(elsewhere / "m-dream" / "model.safetensors", here / "m-dream" / "model.safetensors")
    assert model_identity(adapter).sha256 != identity.sha256  # its base changed under it: so did it


@pytest.mark.slow  # a run and five refused resumes, each loading the base
def test_a_resume_must_be_the_interrupted_run(base, tiny_folders, task, tmp_path, capsys):
    """`train --resume` with another base, other rows or another setting is refused, naming each difference
    (it ran at the checkpoint's learning rate, or merged the first base's LoRA into another, and recorded what was
    asked); the checkpoints stay, and the same run resumes from them."""
    from diffembed_hf.cli import main
    from diffembed_hf.errors import ConfigError

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(dict(FAST, max_steps=4, lora=False, eval_fraction=0.0, save_steps=2)))
    config = TrainingConfig.from_file(settings)
    out, checkpoints = tmp_path / "out", tmp_path / ".out.checkpoints"
    with pytest.raises(KeyboardInterrupt):
        train(base, task[0], out, config, callbacks=[_StopAt(3)])
    kept = sorted(p.relative_to(tmp_path) for p in checkpoints.rglob("*"))
    assert any(p.name == "checkpoint-2" for p in checkpoints.iterdir())

    capsys.readouterr()
    status = main(["train", base, task[0], str(out), "--config", str(settings), "--resume", "--learning-rate", "0.05"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "--learning-rate was 0.001, now 0.05" in err.strip().splitlines()[-1] and "--overwrite" in err
    other_base = str(_tiny_base(tiny_folders, tmp_path / "other-base", seed=3))
    with pytest.raises(ConfigError, match=r"the base model was .*/m \(sha256 .*\), now .*other-base") as refused:
        train(other_base, task[0], out, config, resume=True)
    assert "learning-rate" not in str(refused.value)  # only what differs is named
    with pytest.raises(ConfigError, match=r"the training rows were those of .*train.jsonl.*now of .*heldout.jsonl"):
        train(base, task[1], out, config, resume=True)
    with pytest.raises(ConfigError, match=r"max_steps was 4, now 6; scale was 50.0, now 20"):
        train(base, task[0], out, dataclasses.replace(config, max_steps=6, scale=20.0), resume=True)
    assert sorted(p.relative_to(tmp_path) for p in checkpoints.rglob("*")) == kept  # nothing touched

    result = train(base, task[0], out, config, resume=True)
    assert result.steps == 4 and result.resumed_from == str(checkpoints / "checkpoint-2")


def test_every_step_trains_and_warm_up_warnings_say_what_happens(base, task, tmp_path, caplog):
    """`--max-steps 1` trained nothing: its automatic warm-up of 1 step ran the only step at learning rate 0
    (transformers' warm-up starts at 0), under a warning that the rate "reaches 0.0001 at step 1". Warm-up now
    covers the whole run only when asked (--warmup-steps), every step trains (rate > 0), and the warning states
    what will happen, advising only the option the user gave."""
    from safetensors.torch import load_file

    from diffembed_hf.train import resolve_warmup

    quick = dict(FAST, warmup_steps=None, logging_steps=1)
    with caplog.at_level("WARNING", logger="diffembed_hf.train"):
        one = train(base, task[0], tmp_path / "one",
                    TrainingConfig(max_steps=1, lora=False, eval_fraction=0.0, **quick))
    ran = json.loads((one.output_dir / TRAINING_RECORD).read_text())["training"]
    assert ran["warmup_steps"] == 0 and [e["learning_rate"] for e in ran["losses"]] == [pytest.approx(1e-3)]
    before, after = load_file(f"{base}/model.safetensors"), load_file(one.output_dir / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)  # the step trained
    assert "Warm-up" not in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="diffembed_hf.train"):
        long = train(base, task[0], tmp_path / "long", TrainingConfig(
            max_steps=4, lora=False, eval_fraction=0.0, **dict(quick, warmup_steps=10**9)))
    rates = [e["learning_rate"] for e in json.loads((long.output_dir / TRAINING_RECORD).read_text())[
        "training"]["losses"]]
    assert len(rates) == 4 and 0 < rates[0] < rates[1] < rates[2] < rates[3] < 1e-3  # asked: all warm-up, all train
    assert ("Warm-up (--warmup-steps 1000000000) is longer than the run's 4 steps: every step trains below the "
            "learning rate 0.001" in caplog.text and "never reaches it; give --warmup-steps below 4" in caplog.text)

    caplog.clear()
    with caplog.at_level("WARNING", logger="diffembed_hf.train"):
        assert resolve_warmup(TrainingConfig(max_steps=2, warmup_ratio=0.9)) == 1  # a ratio < 1 is never the run
        assert resolve_warmup(TrainingConfig(max_steps=10, warmup_ratio=0.7)) == 7
    assert "Warm-up takes 7 of the 10 steps (--warmup-ratio 0.7)" in caplog.text
    assert "lower --warmup-ratio" in caplog.text
    assert "--warmup-steps" not in caplog.text  # only the option the user gave is advised
    from diffembed_hf.train import lr_factor

    for schedule in ("linear", "cosine", "constant"):  # every step of a run, warm-up or not, trains
        for warmup, total in ((0, 1), (1, 1), (3, 10), (100, 1000), (10, 4)):
            assert all(lr_factor(s, warmup=warmup, total=total, schedule=schedule) > 0 for s in range(total))


def test_a_warm_up_flag_overrides_the_config_files_warm_up(tmp_path):
    """`--config` with a warmup_ratio and `--warmup-steps` on the command line: the flag wins (it failed as
    "give one, not both"); both forms given as flags are still refused."""
    from diffembed_hf.errors import ConfigError

    path = tmp_path / "settings.json"
    path.write_text('{"max_steps": 40, "warmup_ratio": 0.5}')
    config = TrainingConfig.from_file(path, warmup_steps=3)
    assert (config.warmup_steps, config.warmup_ratio, config.max_steps) == (3, None, 40)
    path.write_text('{"max_steps": 40, "warmup_steps": 30}')
    config = TrainingConfig.from_file(path, warmup_ratio=0.25)
    assert (config.warmup_steps, config.warmup_ratio) == (None, 0.25)
    assert TrainingConfig.from_file(path).warmup_steps == 30  # no flag: the file's
    with pytest.raises(ConfigError, match="warmup_ratio and warmup_steps were both given: give one"):
        TrainingConfig.from_file(path, warmup_steps=3, warmup_ratio=0.1)


def test_adapter_only_refuses_truncate_dim_which_encoding_an_adapter_honours(base, task, tmp_path, capsys):
    """`--adapter-only --truncate-dim` was silently ignored (an adapter has no sentence-transformers files): it is
    refused in one line, and the truncate_dim that message points to, given when encoding an adapter, is honoured
    (load_encoder dropped it for adapter folders)."""
    from peft import LoraConfig, get_peft_model

    from diffembed_hf.cli import main
    from diffembed_hf.encoding import backbone, encode, load_encoder

    capsys.readouterr()
    status = main(["train", base, task[0], str(tmp_path / "out"), "--adapter-only", "--truncate-dim", "16",
                   "--max-steps", "1", "--eval-fraction", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "--truncate-dim" in err[0] and "--adapter-only" in err[0]
    assert not (tmp_path / "out").exists()

    model = load_encoder(base, device="cpu")
    adapter = tmp_path / "adapter"
    get_peft_model(backbone(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(adapter)
    model.tokenizer.save_pretrained(adapter)
    texts = ["alpha beta gamma", "some other words here"]
    full = encode(load_encoder(str(adapter), device="cpu"), texts)
    cut = encode(load_encoder(str(adapter), device="cpu", truncate_dim=16), texts)
    assert full.shape == (2, 64) and cut.shape == (2, 16)
    np.testing.assert_allclose(cut, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-5)


def test_a_matryoshka_models_default_evaluation_goes_on_its_card(tiny_folders, tmp_path):
    """A model trained with --truncate-dim stores it, so `diffembed evaluate MODEL --output MODEL/eval` scores its
    default (truncated) vectors; the card refused those as "compact vectors (--truncate-dim / --precision)",
    options the user never gave. They are the model's own vectors and go on the card; results of other vectors
    are left off with a message naming only the options that made them."""
    from diffembed_hf.model_folder import model_identity
    from diffembed_hf.evaluation.card import card_results
    from diffembed_hf.errors import EvaluationError
    from helpers.evaluation import card_with_results

    folder = _tiny_base(tiny_folders, tmp_path / "model", seed=0)
    stored = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**stored, "truncate_dim": 32}))
    identity = model_identity(folder)

    def results(compact):
        out = tmp_path / f"eval-{compact['truncate_dim']}-{compact['precision']}"
        settings = {"max_seq_length": 64, "query_prompt": "q", "document_prompt": "",
                    "compact": {**compact, "rescore": None, "calibration": None, "calibration_rows": 10000}}
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({
            "format": "diffembed-evaluate-summary", "version": 2, "model": {**identity.as_dict(), "key": identity.key},
            "results": [{"task": "SciFact", "settings": settings, "settings_key": "0", "mteb_version": "2.26.24",
                         "type": "Retrieval", "dataset": "mteb/scifact", "splits": ["test"], "subsets": ["default"],
                         "scores": {"main_score": 0.4321, "metric": "ndcg_at_10", "ndcg_at_10": 0.4321}}]}))
        return out

    default = results({"truncate_dim": 32, "precision": "float32"})  # what evaluate writes with no option
    card = card_with_results(folder, "me/matryoshka", default)
    assert "| SciFact | ndcg_at_10 | 43.21 |" in card.text and "first 32 dimensions" in card.text
    binary = results({"truncate_dim": 32, "precision": "binary"})  # evaluate --precision binary
    with pytest.raises(EvaluationError, match=r"only results of compact vectors \(32 dims, binary\), not of the "
                                              r"model's own \(its first 32 dimensions, float32\); evaluate it "
                                              r"without --precision for the card$"):
        card_results(binary, folder, strict=True)
