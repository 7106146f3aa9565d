"""A model folder is untrusted input, and a result is kept only while it is provably what a rerun would make
(issue 17): no path or link in a folder leads a command outside it, a folder's own code never runs without
--trust-remote-code, a folder's identity covers what changes its vectors and nothing else, damaged or foreign
shards are never kept, one run at a time writes an output, and options are honoured or refused. Also issue 18's
promise that every entry point embeds alike: file mode, corpus mode and sentence-transformers."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.corpus import corpus_rows, read_output, write_jsonl
from helpers.processes import launch

from diffembed_hf import load_dream_tokenizer
from diffembed_hf.model_folder import content_digest, identity_files
from diffembed_hf.cli import main as cli_main
from diffembed_hf.corpus import encode_corpus
from diffembed_hf.encoding import load_encoder
from diffembed_hf.errors import ModelFilesError, OutputLockedError, UntrustedFolderError, UsageError
from diffembed_hf.export import export_vllm
from diffembed_hf.outputs import lock_path, output_lock
from diffembed_hf.sentence_transformer import DEFAULT_QUERY_PROMPT


pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = dict(seed=5, max_seq_length=96, num_attention_heads=2, num_key_value_heads=1)  # `tiny_folders(**MODEL)`


@pytest.fixture(scope="module")
def model_folder(tiny_folders):
    """A tiny DiffEmbed folder with the real Dream tokenizer; heads of 32 so that vLLM's export takes it."""
    return tiny_folders(**MODEL)


@pytest.fixture
def folder(tiny_folders, tmp_path):
    """A private copy of the tiny DiffEmbed folder, free to be tampered with."""
    return tiny_folders.copy(tmp_path / "model", **MODEL)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# --------------------------------------------------------------------------------------------------------------
# Nothing read or written outside the folder and OUT because of what a folder contains
# --------------------------------------------------------------------------------------------------------------


def test_push_dry_run_refuses_a_module_path_leading_outside(folder, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"precious": true}')
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["path"] = "../outside"
    (folder / "modules.json").write_text(json.dumps(modules))
    before = {p: p.read_bytes() for p in outside.rglob("*")}
    status = cli_main(["push", str(folder), "me/model", "--dry-run", "--skip-validation"])
    assert status == 2
    line = error_line(capsys)
    assert "modules.json" in line and "../outside" in line and "outside" in line
    assert {p: p.read_bytes() for p in outside.rglob("*")} == before  # nothing written or linked there
    assert sorted(p.name for p in outside.iterdir()) == ["config.json"]


def test_symlink_leading_outside_is_refused_by_push_and_export(folder, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (folder / "NOTICE").symlink_to(secret)  # a licence file pattern: push and export would take it
    assert cli_main(["push", str(folder), "me/model", "--dry-run", "--skip-validation"]) == 2
    assert "NOTICE" in error_line(capsys)
    with pytest.raises(UntrustedFolderError, match="NOTICE"):
        export_vllm(folder, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    (folder / "NOTICE").unlink()  # control: the same folder without the link exports
    assert (export_vllm(folder, tmp_path / "export") / "config.json").is_file()


def test_export_refuses_a_weight_index_naming_a_file_outside(folder, tmp_path):
    weights = folder / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(weights, outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(UntrustedFolderError, match=r"\.\./elsewhere\.safetensors"):
        export_vllm(folder, tmp_path / "export")
    assert not (tmp_path / "export").exists() and outside.stat().st_nlink == 1  # never linked into an export


def test_convert_refuses_a_source_index_naming_a_file_outside(tmp_path):
    from diffembed_hf.convert import convert_checkpoint

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(UntrustedFolderError, match=r"\.\./\.\./etc/passwd"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _write_marker_code(path: Path, marker: Path) -> None:
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                    "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n"
                    "    model_type = 'evil'\n")


def test_a_foreign_folder_with_its_own_code_never_runs_it(folder, tmp_path, capsys):
    """Another model_type with an auto_map to its own file: `encode` used to import it with no opt-in."""
    marker = tmp_path / "ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    _write_marker_code(folder / "evil.py", marker)
    (tmp_path / "texts.txt").write_text("one\ntwo\n")
    for extra in ([], ["--trust-remote-code"]):  # not a DiffEmbed folder: refused either way, before any import
        status = cli_main(["encode", str(folder), "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "e.npy"),
                           *extra])
        assert status == 2 and "model_type 'evil'" in error_line(capsys)
        assert not marker.exists() and not (tmp_path / "e.npy").exists()
    write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(5))
    status = cli_main(["encode", str(folder), "-i", str(tmp_path / "corpus.jsonl"), "-o", f"{tmp_path / 'shards'}/"])
    assert status == 2 and "model_type 'evil'" in error_line(capsys) and not marker.exists()


def test_each_remote_code_file_is_checked_byte_for_byte(folder):
    """The kernel choice (`attention_kernels.py`) runs in a Hub user's process as the model file does: a copy that
    differs from the package's is the folder's own code; the package's own files are not (in process, none are)."""
    from diffembed_hf.model_folder import REMOTE_CODE_FILES, foreign_code

    assert "attention_kernels.py" in REMOTE_CODE_FILES and (folder / "attention_kernels.py").is_file()
    assert foreign_code(folder) == []  # control: the converted folder's copies are the package's
    code = folder / "attention_kernels.py"
    code.write_text(code.read_text() + "\n# changed\n")
    assert foreign_code(folder) == ["attention_kernels.py"]
    assert foreign_code(folder, in_process=True) == []  # this process uses the package's classes, never the copy


def test_tampered_remote_code_never_runs_in_process_and_push_asks_for_opt_in(folder, model_folder, tmp_path, capsys):
    """DiffEmbed's classes come from the installed package; the folder's copy of them is not imported."""
    marker = tmp_path / "ran"
    code = folder / "modeling_diffembed.py"
    code.write_text(code.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    texts = ["a short text", "another text, a little longer than the first one"]
    tampered = load_encoder(str(folder), device="cpu").encode(texts)
    reference = load_encoder(str(model_folder), device="cpu").encode(texts)
    assert not marker.exists()
    np.testing.assert_allclose(tampered, reference, rtol=0, atol=1e-6)
    # validating before a push runs the folder's code as a Hub user would: that needs the user's opt-in
    assert cli_main(["push", str(folder), "me/model", "--dry-run"]) == 2
    line = error_line(capsys)
    assert "modeling_diffembed.py" in line and "--trust-remote-code" in line and not marker.exists()


def test_a_tokenizer_with_its_own_code_needs_opt_in(folder, tmp_path, capsys):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["my_tokenizer.MyTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "my_tokenizer.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    (tmp_path / "texts.txt").write_text("one\n")
    assert cli_main(["encode", str(folder), "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "e.npy")]) == 2
    line = error_line(capsys)
    assert "my_tokenizer.py" in line and "--trust-remote-code" in line and not marker.exists()


def _add_evil_module(folder: Path, marker: Path) -> None:
    """A tokenizer-named file that no auto_map names, run through a modules.json type (issue 31)."""
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nimport torch\n"
        "class Evil(torch.nn.Module):\n    @classmethod\n    def load(cls, *args, **kwargs):\n        return cls()\n"
        "    def forward(self, features):\n        return features\n")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": "", "type": "tokenization_evil.Evil"})
    (folder / "modules.json").write_text(json.dumps(modules))


def test_every_python_file_and_foreign_module_type_is_folder_code(folder, tmp_path, capsys, monkeypatch):
    """Push (validated or not), encode and evaluate refuse a folder's own code that no auto_map names."""
    marker = tmp_path / "ran"
    _add_evil_module(folder, marker)
    monkeypatch.setenv("HF_TOKEN", "x")
    (tmp_path / "texts.txt").write_text("one\n")
    from helpers.evaluation import write_beir

    beir = write_beir(tmp_path / "beir", {"d1": "one", "d2": "two"}, {"q1": "one?"}, {"q1": {"d1"}})
    commands = {
        "push": ["push", str(folder), "me/x", "--dry-run"],
        "push unvalidated": ["push", str(folder), "me/x", "--dry-run", "--skip-validation"],
        "encode": ["encode", str(folder), "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "e.npy")],
        "evaluate": ["evaluate", str(folder), "--data", beir, "--output", str(tmp_path / "eval")],
    }
    for what, command in commands.items():
        assert cli_main(command) == 2, what
        line = error_line(capsys)
        assert "tokenization_evil.py" in line and "tokenization_evil.Evil" in line, (what, line)
        assert "--trust-remote-code" in line and not marker.exists(), what
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "eval").exists()
    # a Python file alone, whatever its name, is code too; the folder's own DiffEmbed code stays allowed
    (folder / "tokenization_evil.py").rename(folder / "helpers.py")
    modules = json.loads((folder / "modules.json").read_text())[:-1]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert cli_main(commands["push unvalidated"]) == 2 and "helpers.py" in error_line(capsys)
    (folder / "helpers.py").unlink()
    assert cli_main(commands["push unvalidated"]) == 0
    assert "modeling_diffembed.py" in capsys.readouterr().out
    # opted in: the user's choice is honoured (the listing shows the code that would be pushed)
    _add_evil_module(folder, marker)
    assert cli_main([*commands["push unvalidated"], "--trust-remote-code"]) == 0
    assert "tokenization_evil.py" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# A folder's identity: what changes its vectors, and nothing else
# --------------------------------------------------------------------------------------------------------------


def test_identity_ignores_outputs_and_the_card_and_follows_vector_changes(folder, tmp_path):
    before = content_digest(folder)
    (folder / "eval").mkdir()
    (folder / "eval" / "summary.json").write_text("{}")
    (folder / "README.md").write_text("my own notes")
    (folder / "diffembed_training.json").write_text("{}")
    export_vllm(folder, folder / "vllm-export")  # an export written inside the model folder
    (folder / "embeddings").mkdir()
    (folder / "embeddings" / "part-00000.parquet").write_bytes(b"x")
    assert content_digest(folder) == before
    assert not any(name.startswith(("eval", "vllm-export", "embeddings", "README")) for name in identity_files(folder))
    for change in ("tokenizer", "pooling", "weights"):
        changed = Path(shutil.copytree(folder, tmp_path / change))
        if change == "tokenizer":
            (changed / "tokenizer_config.json").write_text((changed / "tokenizer_config.json").read_text() + " ")
        elif change == "pooling":
            pooling = json.loads((changed / "1_Pooling" / "config.json").read_text())
            (changed / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": False}))
        else:
            data = bytearray((changed / "model.safetensors").read_bytes())
            data[-1] ^= 1
            (changed / "model.safetensors").write_bytes(bytes(data))
        assert content_digest(changed) != before, change


def test_corpus_resume_survives_outputs_in_the_model_folder_and_other_spellings(folder, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(60, seed=3))
    out = folder / "embeddings"  # the output inside the model folder must not change the model's identity
    first = encode_corpus(str(folder), source, out, shard_size=20, device="cpu")
    assert first.computed == [0, 1, 2]
    (folder / "README.md").write_text("edited after the run")
    monkeypatch.chdir(tmp_path)
    for spelling in ("corpus.jsonl", "./corpus.jsonl", str(source)):
        again = encode_corpus(str(folder), spelling, out, shard_size=20, device="cpu")
        assert again.computed == [], spelling  # every shard kept: same model, same input


def test_an_output_folder_inside_the_input_folder_is_refused(folder, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", corpus_rows(10))
    assert cli_main(["encode", str(folder), "-i", str(corpus), "-o", str(corpus / "out/")]) == 2
    assert "inside the input folder" in error_line(capsys) and not (corpus / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Shards: never keep a damaged or foreign one; the folder reads as a dataset
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recorded", [True, False], ids=["manifest-digest", "page-checksums-only"])
def test_a_shard_damaged_after_the_run_is_recomputed_and_the_manifest_keeps_the_good_digest(folder, tmp_path,
                                                                                              recorded):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(60, seed=4))
    out = tmp_path / "out"
    first = encode_corpus(str(folder), source, out, shard_size=20, device="cpu")
    digests = {s["file"]: s["sha256"] for s in first.manifest["shards"]}
    if not recorded:  # as after a killed run: no shard digest recorded anywhere, the pages' checksums must do
        manifest = json.loads((out / ".diffembed-manifest.json").read_text())
        del manifest["shards"]
        (out / ".diffembed-manifest.json").write_text(json.dumps(manifest))
    ids, vectors = read_output(out)
    shard = out / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40  # a byte in the data pages; the footer (settings, row count) is intact
    shard.write_bytes(bytes(data))
    again = encode_corpus(str(folder), source, out, shard_size=20, device="cpu")
    assert again.computed == [1]  # only the damaged shard
    assert {s["file"]: s["sha256"] for s in again.manifest["shards"]} == digests
    ids_again, vectors_again = read_output(out)
    assert ids_again == ids and np.array_equal(vectors_again, vectors)


def test_a_shard_that_differs_from_its_recorded_digest_is_recomputed(folder, tmp_path):
    """A shard swapped for another valid one (same settings stamp, same rows) is caught by the manifest."""
    rows = corpus_rows(40, seed=5)
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "out"
    encode_corpus(str(folder), source, out, shard_size=20, device="cpu")
    good = (out / "part-00000.parquet").read_bytes()
    import pyarrow.parquet as pq

    table = pq.read_table(out / "part-00000.parquet")  # the same rows and stamp, written again: other bytes
    pq.write_table(table, out / "part-00000.parquet", compression="none")
    assert (out / "part-00000.parquet").read_bytes() != good
    again = encode_corpus(str(folder), source, out, shard_size=20, device="cpu")
    assert again.computed == [0] and (out / "part-00000.parquet").read_bytes() == good


def test_the_output_folder_reads_as_a_dataset(folder, tmp_path):
    import datasets
    import pandas as pd
    import pyarrow.parquet as pq

    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(50, seed=6))
    out = tmp_path / "out"
    encode_corpus(str(folder), source, out, shard_size=20, device="cpu")
    assert (out / ".diffembed-manifest.json").is_file() and not (out / "manifest.json").exists()
    assert pq.read_table(out).num_rows == 50
    assert len(pd.read_parquet(out)) == 50
    data = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert len(data) == 50 and len(data[0]["embedding"]) == 64


def test_a_second_run_into_a_locked_output_is_refused_naming_the_holder(folder, tmp_path, capsys):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(10))
    out = tmp_path / "out"
    with output_lock(out):  # held by this (live) process, as a running job holds it
        status = cli_main(["encode", str(folder), "-i", str(source), "-o", f"{out}/"])
        line = error_line(capsys)
        assert status == 2 and f"pid {os.getpid()} on {socket.gethostname()}" in line
        assert not out.exists()
    assert not lock_path(out).exists()  # released
    assert cli_main(["encode", str(folder), "-i", str(source), "-o", f"{out}/"]) == 0  # control


def test_a_stale_lock_of_a_dead_run_is_taken_over(folder, tmp_path, caplog):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(10))
    out = tmp_path / "out"
    dead = launch(["-c", "import os; print(os.getpid())"]).stdout.strip()  # a pid that has just ended
    lock_path(out).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "command": "killed"}))
    result = encode_corpus(str(folder), source, out, device="cpu")
    assert result.rows == 10 and "stale lock" in caplog.text and not lock_path(out).exists()


def test_locks_name_other_hosts_and_never_take_them_over(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "another-machine", "since": "now", "command": "x"}))
    with pytest.raises(OutputLockedError, match="pid 1 on another-machine"):
        with output_lock(out):
            pass
    assert lock_path(out).exists()


def test_an_export_finished_meanwhile_is_never_replaced_without_overwrite(folder, model_folder, tmp_path,
                                                                          monkeypatch):
    """A second export into OUT that finishes while this one works (issue 31): this one used to check OUT at its
    start, lock OUT at its end and replace the other's folder with exit 0; now it locks first."""
    import diffembed_hf.export as export_module
    from helpers.locks import run_before_the_lock
    from diffembed_hf.errors import ExportError

    out = tmp_path / "export"
    other = run_before_the_lock(monkeypatch, export_module, lambda: export_vllm(model_folder, out))
    (folder / "NOTICE").write_text("this run's own licence notice")
    with pytest.raises(ExportError, match="already exists"):
        export_vllm(folder, out)
    assert other == [out] and not (out / "NOTICE").exists()  # the other run's folder, kept


def test_a_second_file_mode_encode_into_a_file_being_written_is_refused(folder, tmp_path, monkeypatch, capsys):
    """Two `--overwrite` encodes into one file used to both succeed, the last one's file winning (issue 31)."""
    import diffembed_hf.encoding as encoding_module

    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    out = tmp_path / "e.npy"
    real_load, other = encoding_module.load_encoder, []

    def load_while_another_run_starts(*args, **kwargs):
        if not other:  # the other run starts while this one loads its model
            other.append(cli_main(["encode", str(folder), "-i", str(tmp_path / "b.txt"), "-o", str(out),
                                   "--overwrite"]))
            other.append(error_line(capsys))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(encoding_module, "load_encoder", load_while_another_run_starts)
    assert cli_main(["encode", str(folder), "-i", str(tmp_path / "a.txt"), "-o", str(out), "--overwrite"]) == 0
    assert other[0] == 2 and f"pid {os.getpid()}" in other[1] and "being written" in other[1]
    assert np.load(out).shape == (2, 64) and not lock_path(out).exists()


# --------------------------------------------------------------------------------------------------------------
# Options honoured or refused; the length checked before any work
# --------------------------------------------------------------------------------------------------------------


def test_file_mode_honours_dtype_and_refuses_corpus_options(folder, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("one\ntwo two\n")
    assert cli_main(["encode", str(folder), "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "e.npy"),
                     "--dtype", "float16"]) == 0
    half = np.load(tmp_path / "e.npy")
    assert half.dtype == np.float16 and half.shape == (2, 64)
    for option in (["--shard-size", "5"], ["--skip-bad-rows"], ["--id-field", "x"]):
        status = cli_main(["encode", str(folder), "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "f.npy"),
                           *option])
        assert status == 2 and option[0] in error_line(capsys) and not (tmp_path / "f.npy").exists()


def test_a_length_above_the_models_positions_is_refused_before_any_work(folder, tmp_path, capsys):
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(30))
    (tmp_path / "texts.txt").write_text("one\n")
    file_mode = ["-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "e.npy")]
    corpus_mode = ["-i", str(source), "-o", f"{tmp_path / 'shards'}/", "--shard-size", "10"]
    for mode in (file_mode, corpus_mode):
        status = cli_main(["encode", str(folder), *mode, "--max-seq-length", "100000"])
        assert status == 2 and "max_position_embeddings (512)" in error_line(capsys)
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "shards").exists()
    with pytest.raises(UsageError, match="max_position_embeddings"):
        load_encoder(str(folder), max_seq_length=513)


def test_an_adapter_folder_embeds_exactly_as_its_merged_model(folder, tmp_path):
    base, peft_model, adapter = _trained_adapter(folder, tmp_path)
    texts = ["a query about rivers", "a document about mountains and rivers"]
    merged = peft_model.merge_and_unload()
    merged_vectors = torch.nn.functional.normalize(
        merged(**base.tokenizer(texts, padding=True, return_tensors="pt")).embeddings, dim=-1).detach().numpy()
    got = load_encoder(str(adapter), device="cpu").encode(texts)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # not the unnormalised ~11 of before
    np.testing.assert_allclose(got, merged_vectors, rtol=0, atol=1e-5)
    untouched = load_encoder(str(folder), device="cpu").encode(texts)
    assert np.abs(got - untouched).max() > 1e-3  # control: the adapter changes the vectors


# --------------------------------------------------------------------------------------------------------------
# Issue 31: what a folder or a data set stores is checked where it is read, before any work
# --------------------------------------------------------------------------------------------------------------


def test_a_stored_length_above_the_positions_is_refused_at_load(folder, tmp_path, capsys):
    """sentence_bert_config.json storing 4096 over 512 positions: corpus encode wrote shards, then failed with a
    ValueError on the first long text (only --max-seq-length was checked). Now refused at load, naming the file."""
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**settings, "max_seq_length": 4096}))
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(30))
    command = ["encode", str(folder), "-i", str(source), "-o", f"{tmp_path / 'shards'}/", "--shard-size", "10"]
    assert cli_main(command) == 1
    line = error_line(capsys)
    assert "sentence_bert_config.json" in line and "4096" in line and "max_position_embeddings (512)" in line
    assert not (tmp_path / "shards").exists()
    with pytest.raises(ModelFilesError, match="sentence_bert_config.json stores max_seq_length 4096"):
        load_encoder(str(folder), device="cpu")
    assert cli_main([*command, "--max-seq-length", "64"]) == 0  # a length that fits is the way out


def test_a_qrels_score_out_of_range_is_refused_when_read(folder, tmp_path, capsys):
    """A score of 99999999999999999999 reached pytrec_eval (SystemError) after the embedding work."""
    from helpers.evaluation import write_beir

    beir = Path(write_beir(tmp_path / "beir", {"d1": "one", "d2": "two"}, {"q1": "one?"}, {"q1": {"d1"}}))
    with open(beir / "qrels" / "test.tsv", "a") as handle:
        handle.write("q1\td2\t99999999999999999999\n")
    assert cli_main(["evaluate", str(folder), "--data", str(beir), "--output", str(tmp_path / "eval")]) == 2
    line = error_line(capsys)
    assert "qrels/test.tsv line 3" in line and "99999999999999999999 is out of range" in line
    assert not (tmp_path / "eval").exists()


def test_demo_base_with_a_damaged_config_names_the_file(tmp_path, capsys):
    """`demo --base` on a folder with a broken config.json said JSONDecodeError, naming no file."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "diffembed",')
    assert cli_main(["demo", "--output", str(tmp_path / "out"), "--base", str(base)]) == 1
    line = error_line(capsys)
    assert str(base / "config.json") in line and "JSON" in line


# --------------------------------------------------------------------------------------------------------------
# Issue 31: smaller things
# --------------------------------------------------------------------------------------------------------------


def test_an_output_reached_through_a_link_in_the_input_is_refused(folder, tmp_path, capsys):
    """The input folder's reading follows its links: an output where one leads would be read back as input."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", corpus_rows(10))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (corpus / "more").symlink_to(elsewhere)
    assert cli_main(["encode", str(folder), "-i", str(corpus), "-o", f"{elsewhere / 'out'}/"]) == 2
    line = error_line(capsys)
    assert "inside the input folder" in line and "through a link" in line and not (elsewhere / "out").exists()


def test_a_dangling_link_given_as_out_is_followed(folder, tmp_path, capsys):
    """A link the user made for OUT, to a folder not made yet, gave 'File exists'."""
    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(10))
    (tmp_path / "out").symlink_to(tmp_path / "disk" / "out")
    assert cli_main(["encode", str(folder), "-i", str(source), "-o", f"{tmp_path / 'out'}/"]) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "disk" / "out" / ".diffembed-manifest.json").is_file()


def test_demo_base_that_cannot_be_used_leaves_nothing_in_out(tmp_path, capsys):
    """`demo --base` with a bad base left OUT/data behind."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    assert cli_main(["demo", "--output", str(tmp_path / "out"), "--base", str(base)]) != 0
    error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_local_tasks_of_one_name_never_replace_each_other_and_instructions_are_recorded(folder, tmp_path, capsys):
    """Two BEIR folders of the same name: the second evaluate replaced the first's result. And an --instructions
    entry for a --data task was recorded as coming from 'local task: query prompt'."""
    from helpers.evaluation import stored_results, write_beir

    data = ({"d1": "one", "d2": "two"}, {"q1": "one?"}, {"q1": {"d1"}})
    first, second = write_beir(tmp_path / "a" / "set", *data), write_beir(tmp_path / "b" / "set", *data)
    (tmp_path / "instructions.json").write_text(json.dumps({"Localset": "Find the passage"}))
    out = tmp_path / "eval"
    assert cli_main(["evaluate", str(folder), "--data", first, "--output", str(out),
                     "--instructions", str(tmp_path / "instructions.json")]) == 0
    capsys.readouterr()
    [result] = stored_results(out)
    assert result["prompts"]["source"] == "instruction file" and result["prompts"]["instruction"] == "Find the passage"
    assert result["prompts"]["query"] == "Find the passage:\n"
    assert cli_main(["evaluate", str(folder), "--data", second, "--output", str(out)]) == 2
    line = error_line(capsys)
    assert "same task name" in line and str(Path(first).resolve()) in line
    assert stored_results(out) == [result]  # the first folder's result, kept


def test_another_calibration_rows_is_refused_before_the_sample_is_embedded(folder, tmp_path, monkeypatch):
    import diffembed_hf.corpus.job as corpus_job
    from diffembed_hf.corpus import CorpusError

    source = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(30))
    out = tmp_path / "out"
    encode_corpus(str(folder), source, out, shard_size=10, device="cpu", precision="int8", calibration_rows=10)
    samples, real = [], corpus_job._calibrate
    monkeypatch.setattr(corpus_job, "_calibrate", lambda *args, **kwargs: samples.append(1) or real(*args, **kwargs))
    with pytest.raises(CorpusError, match="calibration"):
        encode_corpus(str(folder), source, out, shard_size=10, device="cpu", precision="int8", calibration_rows=20)
    assert samples == []  # refused before embedding a sample
    assert encode_corpus(str(folder), source, out, shard_size=10, device="cpu", precision="int8",
                         calibration_rows=10).computed == []  # control: the same settings resume


def test_calibration_ranges_beyond_unit_vectors_are_refused():
    """Ranges of +-3e38 passed and every vector got the same codes."""
    from diffembed_hf.compact import CALIBRATION_FORMAT, CalibrationRanges
    from diffembed_hf.errors import CompactError

    ranges = {"format": CALIBRATION_FORMAT, "model": "m", "dim": 2, "rows": 10}
    with pytest.raises(CompactError, match=r"reach 3e\+38.*\[-1, 1\]"):
        CalibrationRanges.from_dict({**ranges, "min": [-3e38, -3e38], "max": [3e38, 3e38]})
    assert CalibrationRanges.from_dict({**ranges, "min": [-1.0, -0.2], "max": [0.3, 1.0]}).dim == 2  # control


def _trained_adapter(folder: Path, tmp_path: Path):
    """A LoRA adapter on `folder` with non-zero weights, saved with its tokenizer; (base, peft model, folder)."""
    from peft import LoraConfig, get_peft_model

    from diffembed_hf.encoding import backbone

    base = load_encoder(str(folder), device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(backbone(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking adapter: B starts at zero
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_dream_tokenizer().save_pretrained(adapter)
    return base, peft_model, adapter


def test_an_adapter_folder_exports_merged_into_its_base(folder, tmp_path):
    """`export vllm` of an adapter said "merge it first", with no command that merges an adapter locally."""
    from safetensors.torch import load_file

    _, peft_model, adapter = _trained_adapter(folder, tmp_path)
    merged = {name.removeprefix("model."): t for name, t in peft_model.merge_and_unload().state_dict().items()}
    out = export_vllm(adapter, tmp_path / "export")
    exported = {name.removeprefix("model."): t for name, t in load_file(out / "model.safetensors").items()}
    base = load_file(folder / "model.safetensors")
    name = "layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(exported[name], merged[name], rtol=0, atol=1e-6)
    assert (exported[name] - base.get(f"model.{name}", base.get(name))).abs().max() > 1e-3  # the adapter is in it
    assert "`adapter`" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "export", "model"]  # no merge folder left


# --------------------------------------------------------------------------------------------------------------
# Issue 18: every entry point embeds alike
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_folder(tiny_folders):
    """A tiny model whose positions reach 2,048 tokens, with the real Dream tokenizer."""
    return tiny_folders(seed=8, max_seq_length=2048, max_position_embeddings=2048)


def test_file_mode_equals_corpus_mode_equals_sentence_transformers(long_folder, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    rng = np.random.default_rng(0)
    words = "river mountain ledger quartz violin orbit harbor pepper lantern cobalt".split()
    tokenizer = load_dream_tokenizer()
    lengths = [1, 2, 7, 30, 120, 400, 900, 1500, 2000]  # in tokens: each text cut to its length, then decoded
    text = " ".join(rng.choice(words, size=2200))
    ids = tokenizer(text)["input_ids"]
    texts = [tokenizer.decode(ids[:n]).strip() for n in lengths]
    tokens = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert min(tokens) == 1 and 1950 <= max(tokens) <= 2048  # texts of 1 to about 2,000 tokens, none truncated
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": str(i), "text": t} for i, t in enumerate(texts)])
    peer = SentenceTransformer(str(long_folder), trust_remote_code=True, device="cpu")
    for prompt_name in (None, "query"):
        option = ["--prompt-name", prompt_name] if prompt_name else []
        file_out, shard_out = tmp_path / f"{prompt_name}.npy", tmp_path / f"{prompt_name}-shards"
        assert cli_main(["encode", str(long_folder), "-i", str(tmp_path / "texts.txt"), "-o", str(file_out),
                         "--max-tokens-per-batch", "3000", *option]) == 0
        assert cli_main(["encode", str(long_folder), "-i", str(tmp_path / "corpus.jsonl"), "-o", f"{shard_out}/",
                         "--shard-size", "4", *option]) == 0
        reference = peer.encode(texts, prompt=DEFAULT_QUERY_PROMPT if prompt_name else None, batch_size=4)
        from_file, (ids, from_shards) = np.load(file_out), read_output(shard_out)
        assert ids == [str(i) for i in range(len(texts))]
        np.testing.assert_allclose(from_file, reference, rtol=0, atol=1e-5)
        np.testing.assert_allclose(from_shards, reference, rtol=0, atol=1e-5)
        if prompt_name:  # control: the prompt must change every vector
            # (a 20-token prompt moves the mean of a 2,000-token text least: still 100x the tolerance above)
            assert np.abs(from_file - np.load(tmp_path / "None.npy")).max(axis=1).min() > 1e-3
