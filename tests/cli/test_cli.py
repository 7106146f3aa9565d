"""The command line as a user meets it: nothing of theirs lost, every bad option refused before any work, one-line
errors with the documented exit status, input read the way they count lines, files with their umask, a quiet
fast CLI. Each test asserts the file system afterwards."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import DREAM_SPECIAL_IDS

from diffembed_hf import load_dream_tokenizer
from diffembed_hf.cli import build_parser, main

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes (and every folder, as None): the state a user would see."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in-process: (exit status, stderr); argparse's own refusals arrive as SystemExit."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def base(tiny_folders):
    """A tiny DiffEmbed folder with the real Dream tokenizer; its config's special ids are the tokenizer's."""
    return tiny_folders(name="m", weights="init", **DREAM_SPECIAL_IDS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"query": f"question number {i} about {w}", "positive": f"an answer on {w}, number {i}"}
            for i, w in enumerate(["tea", "rivers", "chess", "glass", "owls", "tides", "salt", "maps"] * 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# 1. Nothing a user wrote is deleted or overwritten without --overwrite
# ----------------------------------------------------------------------------------------------------------


def test_train_resume_without_checkpoint_keeps_a_folder_it_never_wrote(base, data, tmp_path, capsys):
    out = tmp_path / "out" / "p"
    out.mkdir(parents=True)
    (out / "notes.txt").write_bytes(b"x\n")
    status, err = run(["train", str(base), str(data), str(out), "--max-steps", "2", "--resume",
                       "--batch-size", "4", "--max-seq-length", "64", "--device", "cpu"], capsys)
    assert status == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert snapshot(tmp_path / "out") == {"p": None, "p/notes.txt": b"x\n"}  # no checkpoints folder either


def test_demo_refuses_an_existing_output_folder(tmp_path, capsys):
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "weights.bin").write_bytes(b"days of GPU work")
    before = snapshot(tmp_path)
    status, err = run(["demo", "--output", str(tmp_path / "mine"), "--max-steps", "1"], capsys)
    assert status == 2 and "diffembed demo: error:" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before


def test_encode_refuses_to_overwrite_an_existing_file(base, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "e.npy").write_bytes(b"my earlier embeddings")
    status, err = run(["encode", str(base), "-i", str(texts), "-o", str(tmp_path / "e.npy"), "--device", "cpu"],
                      capsys)
    assert status == 2 and "exists" in err and "--overwrite" in err
    assert (tmp_path / "e.npy").read_bytes() == b"my earlier embeddings"
    status, _ = run(["encode", str(base), "-i", str(texts), "-o", str(tmp_path / "e.npy"), "--device", "cpu",
                     "--overwrite"], capsys)
    assert status == 0 and np.load(tmp_path / "e.npy").shape == (2, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "texts.txt"]  # no partial file left


# ----------------------------------------------------------------------------------------------------------
# 4. Every numeric option of every command validated before any work, with the option and range named
# ----------------------------------------------------------------------------------------------------------

BAD_NUMBERS = {  # option -> (bad values, the accepted range as the message states it)
    "--max-steps": (["0", "-1", "2.5", "many"], "integer >= 1"),
    "--batch-size": (["0", "-4", "x"], "integer >= 1"),
    "--max-seq-length": (["0", "-1", "1e3"], "integer >= 1"),
    "--gradcache": (["0", "-2"], "integer >= 1"),
    "--max-heldout": (["0", "-5"], "integer >= 1"),
    "--learning-rate": (["0", "-1e-4", "nan", "inf", "fast"], "number > 0"),
    "--eval-fraction": (["1", "1.5", "-0.1", "half"], "[0, 1)"),
    "--max-shard-size": (["0", "-5GB", "5 parsecs"], "'5GB'"),
    "--shard-size": (["0", "-1", "ten"], "integer >= 1"),
    "--max-tokens-per-batch": (["0", "-8"], "integer >= 1"),
    "--problems-per-concept": (["0", "-1", "x"], "integer >= 1"),
    "--workers": (["0", "2.5"], "integer >= 1"),
    "--seed": (["-1", "x"], "integer >= 0"),
    "--temperature": (["-0.1", "2.5", "hot"], "[0, 2]"),
    "--max-tokens": (["0", "x"], "integer >= 1"),
    "--answer-retries": (["-1", "x"], "integer >= 0"),
    "--heldout-fraction": (["1", "-0.1"], "[0, 1)"),
    "--timeout": (["0", "nan", "x"], "number > 0"),
    "--max-retries": (["-1", "x"], "integer >= 0"),
    "--truncate-dim": (["0", "-64", "half"], "integer >= 1"),
    "--saved-max-seq-length": (["0", "-1"], "integer >= 1"),
    "--warmup-steps": (["-1", "x"], "integer >= 0"),
    "--warmup-ratio": (["1", "-0.1"], "[0, 1)"),
    "--rescore": (["0", "-10"], "integer >= 1"),
    "--calibration-rows": (["0", "-1"], "integer >= 1"),
    "--lora-layers": (["0", "-2", "x"], "integer >= 1"),
    "--device-memory": (["0", "-5GB", "lots"], "memory size > 0"),
}
COMMANDS = {  # each subcommand's numeric options, and a command line that would otherwise write OUT
    "demo": (["--max-steps", "--max-heldout"], lambda m, d, o: ["demo", "--output", str(o)]),
    "train": (["--max-steps", "--batch-size", "--max-seq-length", "--gradcache", "--learning-rate", "--eval-fraction",
               "--truncate-dim", "--saved-max-seq-length", "--warmup-steps", "--warmup-ratio", "--lora-layers",
               "--device-memory"],
              lambda m, d, o: ["train", str(m), str(d), str(o)]),
    "encode": (["--max-seq-length", "--shard-size", "--max-tokens-per-batch", "--truncate-dim",
                "--calibration-rows", "--device-memory"],
               lambda m, d, o: ["encode", str(m), "-i", str(d), "-o", str(o)]),
    "evaluate": (["--max-seq-length", "--max-tokens-per-batch", "--max-heldout", "--truncate-dim", "--rescore",
                  "--calibration-rows", "--device-memory"],
                 lambda m, d, o: ["evaluate", str(m), "--data", str(d), "--output", str(o)]),
    "convert": (["--max-shard-size", "--max-seq-length"], lambda m, d, o: ["convert", str(m), str(o)]),
    "reasonaug": (["--problems-per-concept", "--workers", "--seed", "--temperature", "--max-tokens", "--answer-retries",
                   "--heldout-fraction", "--timeout", "--max-retries"],
                  lambda m, d, o: ["reasonaug", str(d), str(o), "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]),
}
TABLE = [(command, option, value, BAD_NUMBERS[option][1])
         for command, (options, _) in COMMANDS.items() for option in options for value in BAD_NUMBERS[option][0]]


def test_the_table_covers_every_numeric_option_of_every_subcommand():
    """A new numeric option (another engineer's) must join the table: the parser is the reference."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    found = {(name, opt) for name, p in sub.choices.items() for a in p._actions
             if a.type is not None and a.option_strings for opt in a.option_strings[:1] if opt.startswith("--")}
    assert found == {(command, option) for command, (options, _) in COMMANDS.items() for option in options}


@pytest.mark.parametrize("command, option, value, accepted", TABLE)
def test_bad_numbers_are_refused_before_any_output(base, data, tmp_path, capsys, command, option, value, accepted):
    out = tmp_path / ("out.npy" if command == "encode" else "out")
    argv = COMMANDS[command][1](base, data, out) + [f"{option}={value}"]
    status, err = run(argv, capsys)
    assert status == 2
    assert f"diffembed {command}: error: argument {option}" in err and accepted in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, not even a checkpoints folder


@pytest.mark.parametrize("settings, message", [
    ({"max_steps": 0}, "--max-steps must be an integer >= 1, got 0"),
    ({"batch_size": -1}, "--batch-size must be an integer >= 1"),
    ({"eval_fraction": 1.0}, "--eval-fraction must be a number in [0, 1)"),
    ({"learning_rate": 0}, "--learning-rate must be a number > 0"),
    ({"gradcache_mini_batch_size": 0}, "--gradcache must be an integer >= 1"),
    ({"warmup_steps": -1}, "--warmup-steps must be an integer >= 0"),
    ({"lora_dropout": 1}, "lora_dropout (a --config setting) must be a number in [0, 1), got 1"),
    ({"max_steps": "10"}, "--max-steps must be an integer >= 1, got '10'"),
])
def test_a_config_file_is_held_to_the_same_ranges(base, data, tmp_path, capsys, settings, message):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(settings))
    status, err = run(["train", str(base), str(data), str(tmp_path / "out"), "--config", str(config)], capsys)
    assert status == 2 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_output_locations_are_checked_before_the_work(base, data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    status, err = run(["encode", str(base), "-i", str(data), "-o", str(tmp_path / "missing" / "e.npy")], capsys)
    assert status == 2 and "does not exist" in err
    status, err = run(["train", str(base), str(data), str(tmp_path / "a-file" / "out")], capsys)
    assert status == 2 and "is not a folder" in err
    status, err = run(["train", str(base), str(data), str(tmp_path / "a-file")], capsys)
    assert status == 2 and "is not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_max_seq_length_beyond_the_model_is_refused_before_training(base, data, tmp_path, capsys):
    status, err = run(["train", str(base), str(data), str(tmp_path / "out"), "--max-seq-length", "4096",
                       "--max-steps", "1", "--device", "cpu"], capsys)
    assert status == 2 and "exceeds the model's max_position_embeddings (512)" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# 5. A user error is one line in every command, never a traceback; the documented exit status
# ----------------------------------------------------------------------------------------------------------


def _user_error_cases(base: Path, data: Path, tmp: Path) -> list[tuple[list[str], int, str]]:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "f").write_text("x")
    (tmp / "exists.npy").write_bytes(b"x")
    (tmp / "texts.txt").write_text("a\nb\n")
    (tmp / "bad.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    (tmp / "numbers.csv").write_text("query,positive\n7,p\n8,q\n")
    (tmp / "config.json").write_text('{"lora_rank": 8}')
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    for path in base.rglob("*"):
        if path.is_file():
            (corrupt / path.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
            (corrupt / path.relative_to(base)).write_bytes(path.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    m, d, t = str(base), str(data), str(tmp)
    return [
        (["train", m, d, f"{t}/taken"], 2, "exists and is not empty"),
        (["train", m, f"{t}/missing.jsonl", f"{t}/o1"], 2, "no such file"),
        (["train", m, f"{t}/missing.txt", f"{t}/o1"], 2, "no such file"),
        (["train", f"{t}/no-model", d, f"{t}/o1"], 2, "no such folder"),
        (["train", m, d, f"{t}/o1", "--device", "tpu9"], 2, "--device 'tpu9'"),
        (["train", m, d, f"{t}/o1", "--config", f"{t}/config.json"], 2, "lora_rank"),
        (["train", m, f"{t}/numbers.csv", f"{t}/o1", "--batch-size", "1"], 1,
         "row 1: the query in column 'query' is not text but a int"),
        (["train", m, d, f"{t}/o1", "--max-steps", "0"], 2, "--max-steps"),
        (["encode", m, "-i", f"{t}/texts.txt", "-o", f"{t}/nowhere/e.npy"], 2, "does not exist"),
        (["encode", m, "-i", f"{t}/texts.txt", "-o", f"{t}/exists.npy"], 2, "exists"),
        # one output each: the fresh-process test runs the cases at once, and two runs into one output file meet
        # its lock ("being written by another run"), as they should
        (["encode", m, "-i", f"{t}/texts.txt", "-o", f"{t}/e1.npy", "--device", "cuda:7"], 2, "--device cuda:7"),
        (["encode", m, "-i", f"{t}/texts.txt", "-o", f"{t}/e2.npy", "--device", "cpu", "--prompt-name", "nope"],
         2, "--prompt-name 'nope' is not one of the model's prompts"),
        (["encode", m, "-i", f"{t}/missing.txt", "-o", f"{t}/e3.npy"], 2, "no such file"),
        (["encode", m, "-i", f"{t}/bad.jsonl", "-o", f"{t}/e4.npy"], 1, "bad.jsonl line 2: a JSON list"),
        (["encode", m, "-i", f"{t}/texts.txt", "-o", f"{t}/e.csv"], 2, ".npy or .safetensors"),
        (["convert", m, f"{t}/taken"], 2, "already exists"),
        (["convert", f"{t}/no-source", f"{t}/c1"], 2, "does not exist"),
        (["convert", m, f"{t}/c1", "--max-shard-size", "lots"], 2, "--max-shard-size"),
        (["push", m, "user/bad repo", "--dry-run"], 2, "Invalid repo id"),
        (["push", f"{t}/texts.txt", "user/x", "--dry-run"], 2, "is not a folder"),
        (["push", str(corrupt), "user/x", "--dry-run", "--skip-validation"], 1, "not a readable safetensors file"),
        (["demo", "--output", f"{t}/taken"], 2, "exists and is not empty"),
        (["demo", "--max-steps", "-1"], 2, "--max-steps"),
    ]


@pytest.mark.slow  # a dozen fresh `diffembed` processes, seconds of imports each
def test_user_errors_are_one_line_with_the_documented_status_in_a_fresh_process(base, data, tmp_path):
    cases = _user_error_cases(base, data, tmp_path)
    before = snapshot(tmp_path)

    def call(case):
        argv, _, _ = case
        return subprocess.run([sys.executable, "-m", "diffembed_hf", *argv], capture_output=True, text=True,
                              env=ENV, stdin=subprocess.DEVNULL, timeout=600)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, cases))
    for (argv, status, message), result in zip(cases, results):
        command = argv[0]
        assert "Traceback" not in result.stderr, (argv, result.stderr[-2000:])
        assert result.returncode == status, (argv, result.returncode, result.stderr[-2000:])
        assert f"diffembed {command}: error: " in result.stderr and message in result.stderr, (argv, result.stderr)
    assert snapshot(tmp_path) == before  # no command wrote anything


def test_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, "-m", "diffembed_hf", "encode", "some/model", "-i", "-", "-o",
            str(tmp_path / "x" / "e.npy")]
    with ThreadPoolExecutor(2) as pool:  # two fresh processes side by side: each spends seconds on its imports
        quiet, loud = pool.map(lambda extra: subprocess.run(argv + extra, capture_output=True, text=True, env=ENV,
                                                            stdin=subprocess.DEVNULL), ([], ["--debug"]))
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr and "UsageError" in loud.stderr


# ----------------------------------------------------------------------------------------------------------
# 6. Input read the way the user counts it
# ----------------------------------------------------------------------------------------------------------

ODD_LINES = ["plain", "form\x0cfeed", "vertical\x0btab", "file\x1cseparator", "next\x85line", "line\u2028separator",
             "paragraph\u2029separator", "", "  spaces  ", "naïve 日本語 \U0001f600", "tab\there"]


@pytest.mark.parametrize("bom, newline, final", [(False, "\n", True), (True, "\r\n", False)])
def test_one_text_per_line_whatever_the_line_holds(base, tmp_path, capsys, bom, newline, final):
    from diffembed_hf.encoding import encode, load_encoder

    raw = newline.join(ODD_LINES) + (newline if final else "")
    source = tmp_path / "texts.txt"
    source.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw.encode("utf-8"))
    assert len(raw.encode().splitlines()) < len(raw.splitlines())  # the control: str.splitlines would miscount
    status, _ = run(["encode", str(base), "-i", str(source), "-o", str(tmp_path / "e.npy"), "--device", "cpu"],
                    capsys)
    assert status == 0
    embeddings = np.load(tmp_path / "e.npy")
    assert embeddings.shape == (len(ODD_LINES), 64)  # one row per line an editor shows
    expected = encode(load_encoder(str(base), device="cpu"), ODD_LINES)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)  # the BOM is not part of line 1


@pytest.mark.parametrize("name", ["t.jsonl", "t.ndjson", "t.jsonlines", "-"])
def test_json_lines_under_any_usual_name_or_from_stdin(base, tmp_path, capsys, monkeypatch, name):
    records = [{"body": "first\u2028still first"}, {"body": "second"}, {"body": "third\x0c"}]
    raw = "\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    if name == "-":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw.encode("utf-8")), encoding="utf-8"))
        source = "-"
    else:
        source = str(tmp_path / name)
        Path(source).write_text(raw, encoding="utf-8")
    status, err = run(["encode", str(base), "-i", source, "--field", "body", "-o", str(tmp_path / "e.npy"),
                       "--device", "cpu"], capsys)
    assert status == 0, err
    assert np.load(tmp_path / "e.npy").shape == (3, 64)


# ----------------------------------------------------------------------------------------------------------
# 7. Files written with the user's umask
# ----------------------------------------------------------------------------------------------------------


def modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder.parent).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(base, data, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        assert run(["train", str(base), str(data), str(tmp_path / "trained"), "--max-steps", "1", "--batch-size", "4",
                    "--max-seq-length", "32", "--eval-fraction", "0", "--full", "--device", "cpu"], capsys)[0] == 0
        assert run(["encode", str(base), "-i", str(data), "--field", "query", "-o", str(tmp_path / "e.safetensors"),
                    "--device", "cpu"], capsys)[0] == 0
        source = tmp_path / "qwen2-source"
        _tiny_qwen2_checkpoint(source)
        assert run(["convert", str(source), str(tmp_path / "converted")], capsys)[0] == 0
    finally:
        os.umask(old)
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    for output in (tmp_path / "trained", tmp_path / "converted"):
        found = modes(output)
        assert found and all(mode == (folder_mode if (output.parent / path).is_dir() else file_mode)
                             for path, mode in found.items()), {p: oct(m) for p, m in found.items()}
    assert stat.S_IMODE((tmp_path / "e.safetensors").stat().st_mode) == file_mode


def _tiny_qwen2_checkpoint(folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# 9. A quiet, fast CLI
# ----------------------------------------------------------------------------------------------------------


def test_the_cli_imports_neither_torch_nor_transformers():
    probe = ("import sys, diffembed_hf, diffembed_hf.cli; from diffembed_hf.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers', 'numpy') "
             "if m in sys.modules))")
    control_probe = "import sys, diffembed_hf; diffembed_hf.DiffEmbedConfig; print('transformers' in sys.modules)"
    with ThreadPoolExecutor(2) as pool:  # two fresh processes side by side
        result, control = pool.map(lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                               text=True, env=ENV), (probe, control_probe))
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
    assert control.stdout.strip() == "True"  # the classes still load (and register) on first use


def test_the_auto_classes_are_registered_when_the_classes_are_used():
    probe = ("from diffembed_hf import DiffEmbedConfig; from transformers import AutoConfig, AutoModel; "
             "config = AutoConfig.for_model('diffembed', vocab_size=8, hidden_size=8, intermediate_size=8, "
             "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1); "
             "print(type(config).__name__, type(AutoModel.from_config(config)).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV)
    assert result.stdout.split() == ["DiffEmbedConfig", "DiffEmbedForEmbedding"], result.stderr[-2000:]


def test_version_and_defaults_in_every_help(capsys):
    from diffembed_hf import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"diffembed-hf {__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.nargs == 0 and action.default in (False, None) \
                    or action.required or action.dest in ("help", "verbose", "debug") \
                    or action.help == argparse.SUPPRESS:
                continue  # flags (off unless given), -h, retired options (refused with what replaces them)
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)


def test_train_output_is_quiet(base, data, tmp_path):
    """No FutureWarning flood, no tokenizer/config 'alignment' notice, one summary line."""
    result = subprocess.run([sys.executable, "-m", "diffembed_hf", "train", str(base), str(data), str(tmp_path / "o"),
                             "--max-steps", "2", "--batch-size", "4", "--max-seq-length", "32", "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FutureWarning" not in result.stderr and "deprecated" not in result.stderr, result.stderr
    assert "differ from the model config" not in result.stderr
    assert "Trying to gather" not in result.stderr  # one process: nothing to gather, no warning about it
    assert result.stdout.strip().splitlines()[-1] == f"2 training steps; model written to {tmp_path / 'o'}"


def test_no_indexing_errors_warning_for_texts_truncated_on_purpose(base, capfd, caplog):
    from diffembed_hf.encoding import encode, load_encoder

    model = load_encoder(str(base), device="cpu")
    long_text = "word " * (model.tokenizer.model_max_length + 10)
    with caplog.at_level("WARNING"):
        vectors = encode(model, [long_text, "short"])
    captured = capfd.readouterr()
    assert vectors.shape == (2, 64)
    assert "were truncated" in caplog.text  # our one warning says how many texts were cut
    assert "indexing errors" not in caplog.text + captured.err + captured.out


def test_the_demo_model_and_the_offline_tokenizer_agree_on_special_ids():
    from diffembed_hf.demo import DEFAULT_CONFIG
    from diffembed_hf.modeling.configuration_diffembed import DiffEmbedConfig

    config, tokenizer = DiffEmbedConfig(**DEFAULT_CONFIG), load_dream_tokenizer()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (151665, 151643, 151643)


def test_train_without_its_extra_names_the_pip_command(base, data, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    status, err = run(["train", str(base), str(data), str(tmp_path / "o")], capsys)
    assert status == 1 and "pip install 'diffembed-hf[train]'" in err and "peft" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# 10. Each job of convert and publish found by file name; the public import paths unchanged
# ----------------------------------------------------------------------------------------------------------


def test_convert_and_publish_are_split_by_job_and_keep_their_public_names():
    import importlib

    import diffembed_hf.convert as convert
    import diffembed_hf.publish as publish

    jobs = {"diffembed_hf.convert.families": "detect_family", "diffembed_hf.convert.weights": "write_weights",
            "diffembed_hf.convert.folder": "convert_checkpoint", "diffembed_hf.publish.files": "files_to_push",
            "diffembed_hf.publish.validate": "validate_folder", "diffembed_hf.publish.upload": "upload",
            "diffembed_hf.model_card": "build_model_card"}
    for module, name in jobs.items():
        assert callable(getattr(importlib.import_module(module), name))
    assert convert.convert_checkpoint is importlib.import_module("diffembed_hf.convert.folder").convert_checkpoint
    assert publish.push is importlib.import_module("diffembed_hf.publish.upload").push
    assert publish.build_model_card is importlib.import_module("diffembed_hf.model_card").build_model_card
    for name in ("ConversionError", "FAMILIES", "parse_size"):
        assert hasattr(convert, name)
    for name in ("PublishError", "files_to_push", "folder_kind", "prepare_push", "validate_folder",
                 "REMOTE_CODE_FILES"):
        assert hasattr(publish, name)
