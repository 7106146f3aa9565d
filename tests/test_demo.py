"""The README's main command: build the default model, save, reload as a Hub user, rank."""

import json

from diffembed_hf.cli import main
from diffembed_hf.demo import DEFAULT_CONFIG, DOCUMENTS, QUERY, build_default_model


def test_demo_command_writes_a_hub_ready_folder_and_ranks(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--output", str(folder)]) == 0
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_diffembed.py", "modeling_diffembed.py", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "diffembed" and "AutoModel" in config["auto_map"]
    assert config["vocab_size"] == DEFAULT_CONFIG["vocab_size"]
    lines = capsys.readouterr().out.splitlines()
    assert "untrained" in lines[0] and QUERY in lines[1]
    ranked = lines[2:]
    assert sorted(line.split("  ", 1)[1] for line in ranked) == sorted(DOCUMENTS)
    scores = [float(line.split()[1]) for line in ranked]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


def test_default_model_is_reproducible():
    a, b = build_default_model(seed=1), build_default_model(seed=1)
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))
    assert not (build_default_model(seed=2).model.embed_tokens.weight == a.model.embed_tokens.weight).all()
