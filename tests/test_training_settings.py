"""Training and evaluation settings that work for the user (issue 23) and fit the device (issue 19): warm-up that
lets a short run reach its learning rate, recorded losses, the saved model's length, one instruction -> prompt
rule, gradient checkpointing and input length chosen for a CPU, and no library FutureWarning."""

import json
import logging
import warnings

import pytest
import torch
from helpers.evaluation import write_beir
from helpers.models import tiny_config
from test_train import write_jsonl, word_overlap_rows

from diffembed_hf import device_settings
from diffembed_hf.cli import main
from diffembed_hf.device_settings import resolve_device_settings
from diffembed_hf.evaluation.run import evaluate
from diffembed_hf.sentence_transformer import instruction_prompt
from diffembed_hf.train import ConfigError, TrainingConfig, train

TRAINING_RECORD = "diffembed_training.json"  # written by `diffembed train` into the model folder

pytestmark = pytest.mark.versions  # CI reruns it on the oldest transformers / sentence-transformers

QUICK = dict(batch_size=8, learning_rate=1e-3, save_steps=10**6, query_prompt="", eval_fraction=0.0, lora=False)


@pytest.fixture(scope="module")
def base(tiny_folders):
    """A tiny model whose saved max_seq_length (256) differs from every training length used below."""
    return str(tiny_folders(name="m", weights="init", max_seq_length=256))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rows") / "train.jsonl", word_overlap_rows(200, 0))


@pytest.fixture(scope="module")
def short_run(base, rows, tmp_path_factory):
    """8 steps with every default that decides warm-up and logging (on main: 100 warm-up steps, logging every 10)."""
    out = tmp_path_factory.mktemp("short") / "model"
    result = train(base, rows, out, TrainingConfig(max_steps=8, max_seq_length=64, **QUICK), device="cpu")
    return result, json.loads((out / TRAINING_RECORD).read_text())


def test_a_short_run_reaches_its_learning_rate(short_run):
    _, record = short_run
    ran = record["training"]
    assert ran["warmup_steps"] == 1  # the recipe's 100, capped at a tenth of 8 steps
    assert ran["peak_learning_rate"] == pytest.approx(QUICK["learning_rate"])
    rates = [entry["learning_rate"] for entry in ran["losses"]]  # the rate each step trained at
    # every step trains: warm-up step 1 of 1 at half the rate (transformers' warm-up ran it at 0), then the rate
    assert rates[0] == pytest.approx(QUICK["learning_rate"] / 2) and rates[1] == pytest.approx(QUICK["learning_rate"])
    assert rates[1:] == sorted(rates[1:], reverse=True)  # then the linear decay


def test_a_short_run_records_its_losses(short_run):
    result, record = short_run
    ran = record["training"]
    assert [entry["step"] for entry in ran["losses"]] == list(range(1, 9))  # logged every step of 8
    assert ran["first_loss"] == result.losses[0] == ran["losses"][0]["loss"]
    assert ran["final_loss"] == result.losses[-1] == ran["losses"][-1]["loss"]


def test_warmup_options(base, rows, tmp_path, caplog):
    config = TrainingConfig(max_steps=8, max_seq_length=64, warmup_ratio=0.25, **QUICK)
    train(base, rows, tmp_path / "ratio", config, device="cpu")
    assert json.loads((tmp_path / "ratio" / TRAINING_RECORD).read_text())["training"]["warmup_steps"] == 2
    with caplog.at_level(logging.WARNING, logger="diffembed_hf"):
        train(base, rows, tmp_path / "long", TrainingConfig(max_steps=4, max_seq_length=64, warmup_steps=3, **QUICK),
              device="cpu")
    assert "Warm-up takes 3 of the 4 steps" in caplog.text
    with pytest.raises(ConfigError, match="warmup_ratio and warmup_steps were both given: give one"):
        TrainingConfig(warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match=r"warmup_ratio must be a number in \[0, 1\)"):
        TrainingConfig(warmup_ratio=1.5)


@pytest.mark.parametrize("option, value", [("--warmup-steps", "-1"), ("--warmup-ratio", "1")])
def test_warmup_cli_values_are_checked(option, value, base, rows, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", base, rows, str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option in err and "must be" in err  # a value check, not an unknown option


def test_saved_model_keeps_the_base_length(short_run, base, rows, tmp_path, caplog):
    result, record = short_run
    saved = json.loads((result.output_dir / "sentence_bert_config.json").read_text())
    assert saved["max_seq_length"] == 256  # the base's, not the training length 64 (main saved 64)
    assert record["hyperparameters"]["max_seq_length"] == 64 and record["evaluation"] is None
    with caplog.at_level(logging.INFO, logger="diffembed_hf"):
        asked = train(base, rows, tmp_path / "asked", TrainingConfig(max_steps=1, max_seq_length=64,
                                                                     saved_max_seq_length=128, **QUICK), device="cpu")
    assert json.loads((asked.output_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert "The saved model will carry max_seq_length 128 (as set); training cuts inputs at 64 tokens" in caplog.text


def test_instruction_rule_is_one_rule():
    assert instruction_prompt("Find the code") == "Find the code:\n"
    assert instruction_prompt("Find the code:") == "Find the code:\n"
    assert instruction_prompt("Find the code:\n") == "Find the code:\n"  # a stored prompt maps to itself
    assert instruction_prompt("  ") == "" and instruction_prompt(None) == ""


def test_trained_instruction_becomes_the_query_prompt(base, tmp_path):
    data = [dict(row, instruction="Find the passage sharing the query's words") for row in word_overlap_rows(80, 3)]
    result = train(base, write_jsonl(tmp_path / "rows.jsonl", data), tmp_path / "out",
                   TrainingConfig(max_steps=1, max_seq_length=64, **QUICK), device="cpu")
    prompts = json.loads((result.output_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Find the passage sharing the query's words:\n"  # main kept the web-search prompt
    assert prompts["document"] == ""


def test_evaluate_instructions_apply_to_data_tasks(base, tmp_path):
    """--instructions FILE names a --data task: its queries get that instruction, by the same rule as training
    (main ignored the file for --data tasks); --query-prompt follows the rule too."""
    corpus = {f"d{i}": f"document number {i} about topic {i % 3}" for i in range(6)}
    queries = {f"q{i}": f"topic {i}" for i in range(3)}
    folder = write_beir(tmp_path / "local", corpus, queries, {f"q{i}": {f"d{i}"} for i in range(3)})
    (tmp_path / "instructions.json").write_text(json.dumps({"Locallocal": "Find the document on this topic"}))
    result = evaluate(base, data=folder, output=tmp_path / "eval", instructions=tmp_path / "instructions.json")
    sent = result.record["tasks"]["Locallocal"]["prompts_sent"]
    assert sent == {"query": "Find the document on this topic:\n", "document": ""}
    result = evaluate(base, data=folder, output=tmp_path / "eval2", query_prompt="Find the document on this topic")
    assert result.record["tasks"]["Locallocal"]["prompts_sent"]["query"] == "Find the document on this topic:\n"
    control = evaluate(base, data=folder, output=tmp_path / "eval3")
    assert control.record["tasks"]["Locallocal"]["prompts_sent"]["query"] != "Find the document on this topic:\n"


def test_gradient_checkpointing_is_off_on_cpu_by_default(short_run):
    _, record = short_run
    assert record["hyperparameters"]["gradient_checkpointing"] is False  # main: True on a CPU as well
    assert "fit" in record["training"]["device_settings"]["reasons"]["gradient_checkpointing"]


class _Tokenizer:
    """Token lengths equal to the number of words (what the length choice reads)."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [text.split() for text in texts]}


def test_device_settings_cuda_keeps_the_recipe():
    settings = resolve_device_settings(TrainingConfig(), torch.device("cuda"), tiny_config(), _Tokenizer(),
                                       ["a b c"], 8, 32768)
    assert (settings.max_seq_length, settings.gradient_checkpointing, settings.bf16) == (4096, True, True)
    assert settings.threads is None


def test_device_settings_cpu_length_from_the_data(monkeypatch):
    monkeypatch.setattr(device_settings, "cpu_has_amx", lambda: False)
    texts = [" ".join(["w"] * n) for n in range(1, 101)]  # 1..100 tokens: the 98% quantile is 98 -> 128
    settings = resolve_device_settings(TrainingConfig(), torch.device("cpu"), tiny_config(), _Tokenizer(), texts, 8,
                                       32768)
    assert settings.max_seq_length == 128 and not settings.gradient_checkpointing and not settings.bf16
    assert settings.threads == device_settings.available_cores()
    assert "0.0% of them cut (longest 100)" in settings.reasons["max_seq_length"]
    given = resolve_device_settings(TrainingConfig(max_seq_length=48, gradient_checkpointing=True), torch.device("cpu"),
                                    tiny_config(), _Tokenizer(), texts, 8, 32768)
    assert (given.max_seq_length, given.gradient_checkpointing) == (48, True)
    monkeypatch.setattr(device_settings, "available_memory", lambda: 2**20)  # 1 MiB free: checkpointing must go on
    short = resolve_device_settings(TrainingConfig(), torch.device("cpu"), tiny_config(), _Tokenizer(), texts, 8,
                                    32768)
    assert short.gradient_checkpointing and "more than half" in short.reasons["gradient_checkpointing"]


def test_no_future_warning_from_lora_training(base, rows, tmp_path):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` at every adapter load (main printed the
    FutureWarning twice: LoRA added, adapter merged)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(base, rows, tmp_path / "lora", TrainingConfig(max_steps=1, max_seq_length=64,
                                                            **dict(QUICK, lora=True)), device="cpu")
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future


# --- the CPU recipe's levers (issue 27): LoRA on the last layers only, the learning-rate schedule ---------------------


def _layer_changes(base_folder, trained_folder) -> list[bool]:
    """For each layer of the model, whether any of its weights differs between the two folders."""
    from safetensors.torch import load_file

    before = load_file(f"{base_folder}/model.safetensors")
    after = load_file(f"{trained_folder}/model.safetensors")
    layers = sorted({int(name.split(".")[2]) for name in before if name.startswith("model.layers.")})
    return [any(not torch.equal(before[n], after[n]) for n in before if n.startswith(f"model.layers.{i}."))
            for i in layers]


def test_lora_on_the_last_layers_leaves_the_others_untouched(base, rows, tmp_path):
    config = dict(QUICK, lora=True, max_steps=3, max_seq_length=64)
    last = train(base, rows, tmp_path / "last", TrainingConfig(lora_layers=1, **config), device="cpu")
    assert _layer_changes(base, last.output_dir) == [False, True]  # tiny model: 2 layers
    every = train(base, rows, tmp_path / "every", TrainingConfig(lora_layers=2, **config), device="cpu")
    assert _layer_changes(base, every.output_dir) == [True, True]  # the control: every layer moves
    record = json.loads((last.output_dir / TRAINING_RECORD).read_text())
    assert record["hyperparameters"]["lora_layers"] == 1
    with pytest.raises(ConfigError, match="lora_layers is 3, but the model has 2 layers"):
        train(base, rows, tmp_path / "too-many", TrainingConfig(lora_layers=3, **config), device="cpu")
    with pytest.raises(ConfigError, match="lora_layers must be an integer >= 1"):
        TrainingConfig(lora_layers=0)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedules(base, rows, tmp_path, schedule):
    steps, rate = 12, QUICK["learning_rate"]
    result = train(base, rows, tmp_path / schedule, TrainingConfig(max_steps=steps, max_seq_length=64, warmup_steps=2,
                                                                   lr_scheduler=schedule, logging_steps=1, **QUICK),
                   device="cpu")
    record = json.loads((result.output_dir / TRAINING_RECORD).read_text())
    rates = [entry["learning_rate"] for entry in record["training"]["losses"]]
    # the warm-up of 2 steps: step k of W at k/(W+1) of the rate (`train.lr_factor`: no step trains at 0)
    assert len(rates) == steps and rates[:2] == [pytest.approx(rate / 3), pytest.approx(2 * rate / 3)]
    after = rates[2:]  # the rate each later step trained at
    if schedule == "constant":
        assert after == [pytest.approx(rate)] * (steps - 2)
    else:  # half a cosine from the peak: lr * (1 + cos(pi * t / T)) / 2, t = steps after warm-up, T = 10
        import math

        assert after == [pytest.approx(rate * (1 + math.cos(math.pi * t / 10)) / 2) for t in range(10)]
    with pytest.raises(ConfigError, match="lr_scheduler must be one of linear, cosine, constant"):
        TrainingConfig(lr_scheduler="exponential")


def test_device_settings_cpu_precision_and_lora_layers(monkeypatch):
    """On a CPU: bf16 autocast where AMX multiplies bf16 in hardware, fp32 elsewhere; LoRA on the last third of the
    layers; on CUDA the recipe (every layer); whatever the user gave is kept."""
    texts = ["a b c"] * 10
    cfg = tiny_config(num_hidden_layers=30)
    monkeypatch.setattr(device_settings, "cpu_has_bf16", lambda: True)
    for amx in (True, False):
        monkeypatch.setattr(device_settings, "cpu_has_amx", lambda: amx)
        cpu = resolve_device_settings(TrainingConfig(), torch.device("cpu"), cfg, _Tokenizer(), texts, 8, 32768)
        assert cpu.bf16 is amx and ("AMX" in cpu.reasons["bf16"])
        assert cpu.lora_layers == 10 and "the last 10 layers" in cpu.describe()
    given = resolve_device_settings(TrainingConfig(lora_layers=30, bf16=False), torch.device("cpu"), cfg,
                                    _Tokenizer(), texts, 8, 32768)
    assert (given.lora_layers, given.bf16, given.reasons["lora_layers"]) == (30, False, "as set")
    full = resolve_device_settings(TrainingConfig(lora=False), torch.device("cpu"), cfg, _Tokenizer(), texts, 8, 32768)
    assert full.lora_layers is None and "lora_layers" not in full.reasons  # full fine-tuning: no LoRA to place
    cuda = resolve_device_settings(TrainingConfig(), torch.device("cuda"), cfg, _Tokenizer(), texts, 8, 32768)
    assert cuda.lora_layers is None
