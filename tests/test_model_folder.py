"""`open_model_folder`: a model folder read and checked once per job. Each kind of folder opens with the facts a
job needs (read here independently of the code under test); a damaged or untrusted folder is refused with the
typed error naming the file at fault; and `train` / `evaluate` open the folder exactly once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from diffembed_hf import ModelFolder, open_model_folder
from diffembed_hf import model_folder
from diffembed_hf.model_folder import model_identity
from diffembed_hf.errors import ModelFilesError, UntrustedFolderError, UsageError

SPEC = dict(tokenizer="words", seed=3)  # `tiny_folders(**SPEC)`: a few KB


@pytest.fixture
def folder(tiny_folders, tmp_path):
    """A private copy of a tiny DiffEmbed folder, free to be damaged."""
    return tiny_folders.copy(tmp_path / "model", **SPEC)


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Each kind of folder opens with what a job needs
# --------------------------------------------------------------------------------------------------------------


def test_a_diffembed_folder_opens_with_its_files_read_once(tiny_folders):
    path = tiny_folders(**SPEC)
    opened = open_model_folder(path)
    assert isinstance(opened, ModelFolder) and opened.kind == "model" and opened.path == path
    assert opened.config == read(path / "config.json")
    assert opened.config["model_type"] == "diffembed"
    assert opened.weights == ("model.safetensors",)
    assert "tokenizer.json" in opened.tokenizer_files and "tokenizer_config.json" in opened.tokenizer_files
    assert opened.sentence_transformers == read(path / "config_sentence_transformers.json")
    assert opened.prompts == read(path / "config_sentence_transformers.json")["prompts"] and opened.prompts
    assert opened.sentence_bert["max_seq_length"] == 64  # what the folder was saved with
    assert opened.max_position_embeddings == 512
    assert opened.identity == model_identity(path)  # the same identity every record compares


def test_the_identity_is_computed_on_first_use_only(tiny_folders, monkeypatch):
    calls = []
    real = model_folder.content_digest
    monkeypatch.setattr(model_folder, "content_digest", lambda *a: calls.append(a) or real(*a))
    opened = open_model_folder(tiny_folders(**SPEC))
    assert calls == []  # opening reads no weight bytes for a digest
    first, second = opened.identity, opened.identity
    assert first is second and len(calls) == 1


def test_an_adapter_folder_opens_naming_its_base(tiny_folders, tmp_path):
    base = tiny_folders(**SPEC)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    settings = {"base_model_name_or_path": str(base), "revision": None, "peft_type": "LORA", "r": 4}
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    opened = open_model_folder(adapter)
    assert opened.kind == "adapter" and opened.config == settings
    assert opened.base == (str(base.resolve()), None)
    assert opened.weights == () and opened.max_position_embeddings is None


def test_an_upstream_checkpoint_is_refused_as_not_diffembed(folder):
    config = read(folder / "config.json")
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(UsageError, match=r"config.json has model_type 'qwen2'.*convert it first"):
        open_model_folder(folder)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), r"it has no config.json \(nor adapter_config.json\)"),
    (lambda p: None, "is not a folder"),
])
def test_a_path_that_is_no_model_folder_is_a_usage_error(tmp_path, make, message):
    path = tmp_path / "empty"
    make(path)
    with pytest.raises(UsageError, match=message):
        open_model_folder(path)


# --------------------------------------------------------------------------------------------------------------
# A damaged or untrusted folder: the typed error, naming the file
# --------------------------------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_a_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)


def widen_the_mlp(path: Path) -> None:
    config = read(path)
    path.write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))


@pytest.mark.parametrize("name, damage, message", [
    ("config.json", lambda p: p.write_text("{not json"), "cannot be read as JSON"),
    ("sentence_bert_config.json", lambda p: p.write_text("[1,"), "cannot be read as JSON"),
    ("model.safetensors", truncate, "is not a readable safetensors file"),
    ("model.safetensors", drop_a_tensor, "do not match config.json"),
    ("config.json", widen_the_mlp, r"has shape \[\d+, \d+\], config.json implies"),
])
def test_a_damaged_file_is_named(folder, name, damage, message):
    damage(folder / name)
    with pytest.raises(ModelFilesError, match=message) as caught:
        open_model_folder(folder)
    assert str(folder) in str(caught.value) and name in str(caught.value)  # the folder and the file at fault
    assert caught.value.exit_status == 1


def test_a_folder_without_a_tokenizer_is_refused(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelFilesError, match=f"{folder} has no tokenizer files"):
        open_model_folder(folder)


def test_a_folder_with_its_own_code_needs_the_opt_in(folder):
    (folder / "helper.py").write_text("print('ran')\n")
    with pytest.raises(UntrustedFolderError, match=r"holds its own Python code \(helper.py\)"):
        open_model_folder(folder)
    assert open_model_folder(folder, trust_remote_code=True).kind == "model"  # control: the opt-in opens it


def test_a_link_leading_outside_is_refused(folder, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").unlink()
    os.symlink(outside, folder / "tokenizer_config.json")
    with pytest.raises(UntrustedFolderError, match="tokenizer_config.json leads outside"):
        open_model_folder(folder)


def test_a_module_path_leading_outside_is_refused(folder):
    modules = read(folder / "modules.json")
    modules[1]["path"] = "../elsewhere"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UntrustedFolderError, match="'../elsewhere', a path outside"):
        open_model_folder(folder)


def test_the_undamaged_copy_opens(folder):
    """Control for the cases above: the same private copy, untouched, opens."""
    assert open_model_folder(folder).config == read(folder / "config.json")


# --------------------------------------------------------------------------------------------------------------
# One job, one opening
# --------------------------------------------------------------------------------------------------------------


class Count:
    """Counts the calls of some `model_folder` functions (every check of a folder goes through that module)."""

    def __init__(self, monkeypatch, *names):
        self.calls = {name: [] for name in names}
        for name in names:
            real = getattr(model_folder, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                self.calls[_name].append(args[0] if args else None)
                return _real(*args, **kwargs)

            monkeypatch.setattr(model_folder, name, spy)

    def __getitem__(self, name):
        return len(self.calls[name])


def test_evaluate_opens_and_checks_the_folder_once(tiny_folders, tmp_path, monkeypatch):
    pytest.importorskip("mteb")
    from helpers.evaluation import write_beir

    from diffembed_hf.evaluation.run import evaluate

    model = tiny_folders(**SPEC)
    data = write_beir(tmp_path / "data" / "tiny", {"d1": "w2 w3 w4", "d2": "w5 w6 w7", "d3": "w8 w9 w10"},
                      {"q1": "w2 w3", "q2": "w6"}, {"q1": {"d1": 1}, "q2": {"d2": 1}})
    count = Count(monkeypatch, "open_model_folder", "check_folder", "check_remote_code", "check_weights_match",
                  "content_digest")
    evaluate(str(model), data=data, output=tmp_path / "out", query_prompt="")
    assert (count["open_model_folder"], count["check_folder"], count["check_remote_code"],
            count["check_weights_match"], count["content_digest"]) == (1, 1, 1, 1, 1)


def test_train_opens_the_base_once_even_when_it_merges_a_lora_adapter(tiny_folders, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from diffembed_hf.train import TrainingConfig, train

    base = tiny_folders(**SPEC)
    rows = [{"query": f"w{i} w{i + 1}", "positive": f"w{i} w{i + 1} w{i + 2}", "negative": f"w{i + 40} w{i + 41}"}
            for i in range(2, 34)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    count = Count(monkeypatch, "open_model_folder", "check_folder", "check_weights_match", "content_digest")
    config = TrainingConfig(max_steps=2, lora=True, batch_size=8, max_seq_length=16, eval_fraction=0.0,
                            warmup_steps=0, save_steps=10**6, logging_steps=1, query_prompt="", bf16=False)
    result = train(str(base), str(data), tmp_path / "out", config, device="cpu")
    assert (tmp_path / "out" / "model.safetensors").is_file() and result is not None  # merged and written
    assert (count["open_model_folder"], count["check_folder"], count["check_weights_match"],
            count["content_digest"]) == (1, 1, 1, 1)
