"""Errors a user can act on, and quiet output: every case runs `python -m diffembed_hf ...` in a fresh process
(offline), as a user meets it, and checks the one-line message (`diffembed CMD: error: ...`, no traceback, no
"run again with --debug" tail: the CLI's fallback for a failure nobody foresaw), the exit status (2: a wrong
option or environment, found before any work; 1: a job that failed), the files afterwards, and, for the quiet
cases, that stderr holds only the lines a user needs.

A few cases need a failure in the middle of a run (an output file appearing while the texts are embedded, a
torchrun rank failing in its shard): they run this file as a script, `python tests/cli/test_errors.py MODE ARGS...`,
which installs the failure and runs the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                                                           "HF_HUB_DISABLE_PROGRESS_BARS")}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
TEXTS = ["w2 w3 w4", "w5 w6", "w7 w8 w9 w10"]


def cli(*args: str, env: dict | None = None, script: str | None = None, timeout: float = 600):
    """`python -m diffembed_hf ARGS` (or this file as a script, which installs a failure first)."""
    command = [sys.executable, *([__file__, script] if script else ["-m", "diffembed_hf"]), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**ENV, **(env or {})},
                          stdin=subprocess.DEVNULL, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path below `folder` (links as where they point) with its bytes: what a user would find."""
    return {p.relative_to(folder).as_posix(): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                               p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def assert_one_error_line(result, command: str, status: int | tuple[int, ...], *fragments: str) -> str:
    """The run failed with `status` and said why on exactly one line, the last, naming each fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode in (status if isinstance(status, tuple) else (status,)), (result.returncode,
                                                                                       result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"{command}: error: ") and "--debug" not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# ----------------------------------------------------------------------------------------------------------
# A tiny model folder (vocabulary of 128 words, head size 32 so that the vLLM export accepts it) and inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_folders) -> Path:
    return tiny_folders(name="tiny", seed=3, tokenizer="words", num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """texts.txt, corpus.jsonl (ids and texts), a BEIR folder, training rows."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "texts.txt").write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
    rows = [{"_id": f"d{i}", "text": f"w{2 + i} w{3 + i} w{4 + i}"} for i in range(12)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text((root / "corpus.jsonl").read_text())
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"w{2 + i} w{3 + i}"}) + "\n"
                                                for i in range(4)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n"
                                                                                       for i in range(4)))
    (root / "train.jsonl").write_text("".join(json.dumps({"query": f"w{i} w{i + 1}", "positive": f"w{i + 2} w{i + 3}"})
                                              + "\n" for i in range(2, 14)))
    return root


@pytest.fixture(scope="module")
def qwen2_source(tmp_path_factory) -> Path:
    """A tiny upstream Qwen2 checkpoint, as `diffembed convert` takes one."""
    import torch
    from helpers.models import word_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("source") / "qwen2"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _copy(model: Path, where: Path) -> Path:
    import shutil

    return Path(shutil.copytree(model, where))


# ----------------------------------------------------------------------------------------------------------
# 1. torchrun's variables without torchrun
# ----------------------------------------------------------------------------------------------------------

STRAY = {
    "RANK alone": ({"RANK": "1"}, ["RANK=1"]),
    "WORLD_SIZE without MASTER_ADDR": ({"WORLD_SIZE": "2", "RANK": "0"}, ["WORLD_SIZE=2", "MASTER_ADDR"]),
    "RANK >= WORLD_SIZE": ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"},
                           ["RANK=3", "WORLD_SIZE=2"]),
    "not a number": ({"RANK": "one"}, ["RANK='one'"]),
}


@pytest.mark.slow  # a dozen fresh `diffembed` processes, seconds of imports each
def test_stray_torchrun_variables_are_named_with_what_to_do(model, inputs, tmp_path):
    """Before: RANK=1 alone crashed after loading the model (AttributeError), WORLD_SIZE=2 raised torch's
    rendezvous ValueError, RANK=3 of 2 waited for ever. Now each is refused before any work, naming the variables
    and the two ways out; `train` reads them too."""
    runs = [("encode", env, names, ["encode", model, "-i", inputs / "corpus.jsonl", "-o", f"{tmp_path / key}/"])
            for key, (env, names) in STRAY.items()]
    runs.append(("train", {"RANK": "1"}, ["RANK=1"],
                 ["train", model, inputs / "train.jsonl", tmp_path / "trained", "--max-steps", "1", "--device", "cpu",
                  "--max-seq-length", "64"]))
    # file mode under a (real) torchrun: every rank would embed every text into the same file
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    runs.append(("encode", torchrun, ["file mode", "runs in one process", "--output a folder"],
                 ["encode", model, "-i", inputs / "texts.txt", "-o", tmp_path / "e.npy"]))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda run: cli(*run[3], env=run[1], timeout=300), runs))
    for (command, env, names, _), result in zip(runs, results):
        assert_one_error_line(result, f"diffembed {command}", 2, *names, *(["torchrun", "unset"] if env != torchrun
                                                                           else []))
    assert list(tmp_path.iterdir()) == []  # no output, no lock, no checkpoints


# ----------------------------------------------------------------------------------------------------------
# 2. A missing or damaged file in the model folder: named, for every command that loads a model
# ----------------------------------------------------------------------------------------------------------

DAMAGE = {
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     "has no tokenizer files"),
    "tokenizer.json not a tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0"}'),
                                       "tokenizer.json is not a tokenizer"),
    "tokenizer_config.json": (lambda f: (f / "tokenizer_config.json").write_text("{not json"),
                              "tokenizer_config.json cannot be read as JSON"),
    "config.json": (lambda f: (f / "config.json").write_text('{"model_type": "diffembed",'),
                    "config.json cannot be read as JSON"),
    "pooling config": (lambda f: (f / "1_Pooling" / "config.json").write_text("{"),
                       "1_Pooling/config.json cannot be read as JSON"),
    "weights cut short": (lambda f: os.truncate(f / "model.safetensors", 4000),
                          "model.safetensors is not a readable safetensors file"),
    "a tensor missing": (lambda f: _drop_tensor(f / "model.safetensors", "model.layers.1.mlp.up_proj.weight"),
                         "(model.safetensors) do not match config.json"),
}


def _drop_tensor(path: Path, name: str) -> None:
    """A weight file whose header is whole but which lacks a tensor: transformers would initialise it at random."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_damaged_model_folder_is_named_by_encode(model, inputs, tmp_path):
    """Before: a damaged tokenizer was reported as "Unrecognized processing class" after every weight had loaded,
    damaged weights as a raw SafetensorError, and a weight file lacking a tensor embedded with that tensor random
    (exit status 0); now the file is named, before the model loads (exit status 1)."""
    folders = {}
    for case, (damage, _) in DAMAGE.items():
        folders[case] = _copy(model, tmp_path / "models" / case.replace(" ", "-"))
        damage(folders[case])
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)

    def encode(case):  # -v: transformers' "Loading weights" bar shows whether the model began to load
        return cli("encode", folders[case], "-i", inputs / "texts.txt", "-o", tmp_path / "out" / f"{case}.npy", "-v")

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(DAMAGE, pool.map(encode, DAMAGE)))
    for case, result in results.items():
        assert_one_error_line(result, "diffembed encode", 1, DAMAGE[case][1], str(folders[case]))
        # refused before any weight loaded, except the tokenizer.json only the tokenizers library can judge
        # (named once the load failed); that run is also the control that -v would show the bar
        loaded = case == "tokenizer.json not a tokenizer"
        assert ("Loading weights" in result.stderr) == loaded, (case, result.stderr[-3000:])
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # a dozen fresh `diffembed` processes, seconds of imports each
def test_a_damaged_tokenizer_is_named_by_every_command_that_loads_the_model(model, qwen2_source, inputs, tmp_path):
    """The tokenizer.json that transformers cannot read (it passes every cheap check): corpus mode, evaluate,
    train, export (which copies the tokenizer without loading it), push's validation in a fresh process, and
    convert's source (before: a bare KeyError)."""
    folder = _copy(model, tmp_path / "damaged")
    source = _copy(qwen2_source, tmp_path / "source")
    for damaged in (folder, source):
        (damaged / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Unigram"}}')
    before = snapshot(tmp_path)
    runs = {
        "convert": ["convert", source, tmp_path / "converted"],
        "encode": ["encode", folder, "-i", inputs / "corpus.jsonl", "-o", f"{tmp_path / 'corpus'}/"],
        "evaluate": ["evaluate", folder, "--data", inputs / "beir", "--output", tmp_path / "eval"],
        "train": ["train", folder, inputs / "train.jsonl", tmp_path / "trained", "--max-steps", "1", "--device", "cpu",
                  "--max-seq-length", "64"],
        "export vllm": ["export", "vllm", folder, tmp_path / "vllm"],
        "push": ["push", folder, "user/tiny", "--dry-run"],
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(lambda args: cli(*args), runs.values())))
    for command, result in results.items():
        named = (source if command == "convert" else folder) / "tokenizer.json"
        line = assert_one_error_line(result, f"diffembed {command}", 1, f"{named} is not a tokenizer")
        assert "/tmp/diffembed-" not in line  # push names the user's folder, not its staging copy
    assert snapshot(tmp_path) == before  # no output, lock, staging or checkpoint folder left


# ----------------------------------------------------------------------------------------------------------
# 3. An output that appears while the job runs; one rank of a torchrun job failing
# ----------------------------------------------------------------------------------------------------------


def test_an_output_file_that_appears_during_the_run_is_kept_and_named(model, inputs, tmp_path):
    """Before: the file someone wrote while the texts were embedded was silently replaced. Now it is kept, and the
    run ends with one line saying so (exit status 1: the work was done and is not kept)."""
    output = tmp_path / "e.npy"
    result = cli("encode", model, "-i", inputs / "texts.txt", "-o", output, script="appear")
    assert_one_error_line(result, "diffembed encode", 1, f"{output} appeared while this command ran",
                          "nothing was written", "--overwrite")
    assert snapshot(tmp_path) == {"e.npy": b"someone else's file\n"}  # no temporary file left either


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_torchrun_rank_is_reported_once_by_rank_0(model, inputs, tmp_path):
    """Rank 1 of 2 hits a full disk in its first shard. Before: rank 1 printed a raw OSError and rank 0 gloo's
    "Connection closed by peer". Now rank 0 says which rank failed and why, on one line, and rank 1 says nothing
    misleading. Each rank's output is kept apart (torchrun --redirects) so that this is checked rank by rank."""
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--log-dir", str(logs),
               "--redirects", "3", __file__, "rank-1-disk-full", "encode", str(model), "-i",
               str(inputs / "corpus.jsonl"), "-o", f"{tmp_path / 'out'}/", "--shard-size", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode != 0
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(rank_logs) == [0, 1], (sorted(rank_logs), result.stderr[-3000:])
    out = tmp_path / "out"
    expected = f"rank 1 of 2 failed: {out / 'part-00001.parquet'}: No space left on device"
    assert_one_error_line(subprocess.CompletedProcess(command, result.returncode, "", rank_logs[0]),
                          "diffembed encode", 1, expected)
    for text in (rank_logs[1], result.stderr, result.stdout):
        assert "error:" not in text and "Connection closed" not in text and "RuntimeError" not in text, text[-3000:]
    assert not any("diffembed_hf" in line for line in result.stderr.splitlines() if line.startswith("  File"))
    # what rank 0 computed is kept for a resumed run; nothing half-written under a final name
    assert not (out / "part-00001.parquet").exists() and not list(out.glob(".part-*"))


# ----------------------------------------------------------------------------------------------------------
# 4. Advice that works when it is followed
# ----------------------------------------------------------------------------------------------------------


def in_process(*args: str, capsys) -> subprocess.CompletedProcess:
    """The CLI in this process (no fresh interpreter to start): for the runs around the case under test."""
    from diffembed_hf.cli import main

    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def test_a_corrupt_manifest_is_replaced_by_the_overwrite_its_message_suggests(model, inputs, tmp_path, capsys):
    """Before: --overwrite, as the message advised, failed the same way."""
    out = tmp_path / "corpus"
    args = ["encode", model, "-i", inputs / "corpus.jsonl", "-o", f"{out}/", "--shard-size", "5", "--device", "cpu"]
    assert in_process(*args, capsys=capsys).returncode == 0
    manifest = out / ".diffembed-manifest.json"
    manifest.write_text('{"format": "diffembed-corpus-embeddings/1", "complete": tr')
    refused = cli(*args)
    line = assert_one_error_line(refused, "diffembed encode", (1, 2), manifest.name, "--overwrite")
    followed = in_process(*args, "--overwrite", capsys=capsys)
    assert followed.returncode == 0, (line, followed.stderr[-3000:])
    assert json.loads(manifest.read_text())["complete"] is True
    assert "12 embeddings in 3 shards (3 computed now" in followed.stderr


def test_a_mistyped_field_is_not_answered_with_skip_bad_rows(model, inputs, tmp_path, capsys):
    """--skip-bad-rows would skip every row of a corpus whose rows lack the field: the message names the option
    that fixes it (before the model loads), and --skip-bad-rows is offered only where it leaves rows to embed."""
    out = tmp_path / "out"
    wrong = cli("encode", model, "-i", inputs / "corpus.jsonl", "-o", f"{out}/", "--field", "body", "-v")
    line = assert_one_error_line(wrong, "diffembed encode", 2, "no field 'body'", "_id, text", "--field")
    assert "pass --skip-bad-rows" not in line
    assert "Loading weights" not in wrong.stderr and not out.exists()  # -v shows the bar had the model loaded

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((inputs / "corpus.jsonl").read_text() + '{"_id": "odd", "body": "w3"}\n')
    refused = in_process("encode", model, "-i", mixed, "-o", f"{out}/", "--device", "cpu", capsys=capsys)
    assert_one_error_line(refused, "diffembed encode", 2, "line 13", "pass --skip-bad-rows")
    followed = in_process("encode", model, "-i", mixed, "-o", f"{out}/", "--device", "cpu", "--skip-bad-rows",
                          capsys=capsys)
    assert followed.returncode == 0 and "12 embeddings in 1 shards" in followed.stderr, followed.stderr[-3000:]


def test_export_overwrite_onto_a_symlinked_output_succeeds_and_keeps_the_link(model, tmp_path):
    """Before: the export was written and the command then exited 1. Now: exit 0, the link still points at the
    folder, which holds the new export and nothing of the old one."""
    target = tmp_path / "disk" / "vllm"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old export\n")
    link = tmp_path / "vllm"
    link.symlink_to(target, target_is_directory=True)
    result = cli("export", "vllm", model, link, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert not (target / "old.txt").exists() and json.loads((target / "config.json").read_text())["is_causal"] is False
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["vllm"]  # no staging or old copy left


# ----------------------------------------------------------------------------------------------------------
# 5. Quiet by default
# ----------------------------------------------------------------------------------------------------------

NOISE = ("Loading weights", "Loading checkpoint shards", "Writing model shards", "Generating train split",
         "Computing widget examples", "Warning", "warn", "deprecated", ".tmp-", ".partial", "/tmp/diffembed-push-",
         "Traceback", "torchao")


def assert_quiet(text: str, allowed: list[str]) -> None:
    """No library noise, and every line one of the `allowed` patterns."""
    for noise in NOISE:
        assert noise not in text, (noise, text[-3000:])
    for line in filter(None, (part.strip() for part in re.split(r"[\r\n]", text))):
        assert any(re.fullmatch(pattern, line) for pattern in allowed), (line, text[-3000:])


ATTENTION = r"DiffEmbed attention path: \w+"


@pytest.mark.slow  # a dozen fresh `diffembed` processes, seconds of imports each
def test_encode_evaluate_export_and_push_are_quiet(model, inputs, tmp_path):
    runs = {
        "encode": ["encode", model, "-i", inputs / "texts.txt", "-o", tmp_path / "e.npy"],
        "corpus": ["encode", model, "-i", inputs / "corpus.jsonl", "-o", f"{tmp_path / 'corpus'}/"],
        "evaluate": ["evaluate", model, "--data", inputs / "beir", "--output", tmp_path / "eval"],
        "export": ["export", "vllm", model, tmp_path / "vllm"],
        "push": ["push", model, "user/tiny", "--dry-run"],
    }
    allowed = {
        "encode": [ATTENTION, re.escape(f"3 embeddings (float32, 64 values per row) -> {tmp_path / 'e.npy'}")],
        "corpus": [ATTENTION, r"rank 0: 1 of its 1 shards to compute",
                   re.escape(f"12 embeddings in 1 shards (1 computed now, 0 kept from before; 0 bad rows skipped) -> "
                             f"{tmp_path / 'corpus'}")],
        "evaluate": [ATTENTION],
        "export": [re.escape(f"Wrote {tmp_path / 'vllm'} (Qwen2Model; 1 of 1 weight files hard-linked)")],
        "push": [re.escape(f"Validating {model}: loading it in a fresh offline process with AutoModel and "
                           "SentenceTransformer")],
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(lambda args: cli(*args), runs.values())))
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert_quiet(result.stderr, allowed[name])
        assert_quiet(result.stdout, [r".*"])  # the results and listings on stdout: no noise either
    assert "Localbeir" in results["evaluate"].stdout and "tokenizer.json" in results["push"].stdout


def test_train_is_quiet(model, inputs, tmp_path):
    """The training steps' bar and the trainer's loss lines stay; the libraries' bars ("Loading weights" twice,
    "Generating train split", "Computing widget examples", "Writing model shards") and the staging folder's name
    do not."""
    result = cli("train", model, inputs / "train.jsonl", tmp_path / "trained", "--max-steps", "2", "--batch-size", "4",
                 "--device", "cpu", "--eval-fraction", "0", "--max-seq-length", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    bar = r"\d+%\|.*"  # the trainer's step bar, frame by frame
    settings = r"Training on cpu: max_seq_length 64 \(as set\); gradient checkpointing off .*"  # why, once
    saved = r"The saved model will carry max_seq_length \d+ .*"
    assert_quiet(result.stderr, [ATTENTION, r"Training rows: 12 \(negatives per row: 0\); held-out rows: 0", bar,
                                 settings, saved,
                                 re.escape(f"Fine-tuned model written to {tmp_path / 'trained'}") + r" in \d+ s"])
    assert result.stdout.strip().splitlines()[-1] == f"2 training steps; model written to {tmp_path / 'trained'}"


# ----------------------------------------------------------------------------------------------------------
# The script side: a failure installed in the middle of a run
# ----------------------------------------------------------------------------------------------------------


def _appear(args: list[str]) -> int:
    """Someone writes the output file while the texts are being embedded."""
    from diffembed_hf import encoding
    from diffembed_hf.cli import main

    output = Path(args[args.index("-o") + 1])
    embed = encoding.encode

    def encode_then_appear(*a, **kw):
        result = embed(*a, **kw)
        output.write_text("someone else's file\n")
        return result

    encoding.encode = encode_then_appear
    return main(args)


def _rank_1_disk_full(args: list[str]) -> int:
    """Rank 1's first shard cannot be written: the disk is full."""
    from diffembed_hf.cli import main
    from diffembed_hf.corpus.job import CorpusJob

    compute = CorpusJob.compute

    def compute_or_fail(self, shard, encoder, progress=None):
        if os.environ.get("RANK") == "1":
            path = self.output_dir / f"part-{shard:05d}.parquet"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return compute(self, shard, encoder, progress)

    CorpusJob.compute = compute_or_fail
    return main(args)


if __name__ == "__main__":  # python tests/cli/test_errors.py MODE ARGS...
    import logging

    for name in ("torchao", "torch.utils._pytree"):  # as the CLI does before its heavy imports
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.exit({"appear": _appear, "rank-1-disk-full": _rank_1_disk_full}[sys.argv[1]](sys.argv[2:]))
