"""Corpus mode at int8 and binary: the stored codes against sentence-transformers' quantize_embeddings on the
float32 run's vectors, the manifest's calibration ranges reused for queries, shard sizes, resume after SIGKILL and
torchrun giving exactly what one uninterrupted process gives, and the refusals."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.corpus import MODEL, corpus_rows, write_jsonl
from helpers.processes import launch
from sentence_transformers import quantize_embeddings
from test_compact import SCALAR_OK, needs_scalar

from diffembed_hf import compact
from diffembed_hf.cli import main as cli_main
from diffembed_hf.corpus import encode_corpus
from diffembed_hf.encoding import encode, load_encoder

ROWS = corpus_rows(500, seed=7)
DISTRIBUTED = Path(__file__).with_name("test_corpus_distributed.py")  # its script mode SIGKILLs a run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "corpus.jsonl", ROWS)


@pytest.fixture(scope="module")
def float_run(folder, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("float") / "out"
    encode_corpus(str(folder), source, out, shard_size=200, title_field="title", device="cpu")
    return out


def codes(out: Path) -> tuple[list[str], np.ndarray]:
    """ids and the stored values of every shard, in their stored type."""
    ids, values = [], []
    for path in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(path)
        ids += table.column("id").to_pylist()
        column = table.column("embedding").combine_chunks()
        values.append(column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1))
    return ids, np.concatenate(values)


def shard_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("part-*.parquet"))


def run_cli(*args):
    try:
        return cli_main(["encode", *map(str, args), "--device", "cpu", "--no-progress"])
    except SystemExit as exit_:
        return exit_.code


def test_binary_corpus_stores_sentence_transformers_bits_at_an_eighth_of_a_byte_per_dimension(folder, source, float_run,
                                                                                               tmp_path):
    out = tmp_path / "bits"
    assert run_cli(folder, "-i", source, "-o", f"{out}/", "--shard-size", 200, "--title-field", "title",
                   "--precision", "binary") == 0
    ids, stored = codes(out)
    float_ids, floats = codes(float_run)
    assert ids == float_ids == [r["_id"] for r in ROWS]
    assert pq.read_schema(out / "part-00000.parquet").field("embedding").type == pa.list_(pa.int8(), 8)
    assert np.array_equal(stored, quantize_embeddings(floats, precision="binary"))  # bit-identical
    manifest = json.loads((out / ".diffembed-manifest.json").read_text())
    assert manifest["precision"] == manifest["dtype"] == "binary" and manifest["dim"] == 64
    assert manifest["bytes_per_vector"] == 8 and manifest["calibration"] is None
    ratio = shard_bytes(out) / shard_bytes(float_run)
    print(f"binary shards: {shard_bytes(out)} bytes, float32: {shard_bytes(float_run)} bytes, ratio {ratio:.3f}")
    assert ratio < 0.35  # 8 bytes of codes against 256 of floats per row; ids and parquet overhead remain

    # truncated first, then packed: 32 dimensions in 4 bytes, from the renormalised first 32 dimensions
    cut = tmp_path / "cut"
    assert run_cli(folder, "-i", source, "-o", f"{cut}/", "--shard-size", 200, "--title-field", "title",
                   "--precision", "ubinary", "--truncate-dim", 32) == 0
    assert np.array_equal(codes(cut)[1], quantize_embeddings(floats[:, :32], precision="ubinary"))
    assert json.loads((cut / ".diffembed-manifest.json").read_text())["truncate_dim"] == 32


@needs_scalar
def test_int8_corpus_codes_and_its_ranges_reused_for_queries(folder, source, float_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert run_cli(folder, "-i", source, "-o", f"{out}/", "--shard-size", 200, "--title-field", "title",
                   "--precision", "int8", "--calibration-rows", 100) == 0
    manifest = json.loads((out / ".diffembed-manifest.json").read_text())
    ranges = compact.load_calibration(out)
    _, floats = codes(float_run)
    sample = floats[[i * 500 // 100 for i in range(100)]]  # the evenly spread sample: rows 0, 5, 10, ...
    np.testing.assert_array_equal(ranges.minimum, sample.min(axis=0))
    assert ranges.rows == 100 and ranges.dim == 64
    assert ranges.model["model_sha256"] == manifest["settings"]["model_sha256"]
    stored = codes(out)[1]
    assert stored.dtype == np.int8 and stored.shape == (500, 64)
    assert np.array_equal(stored, quantize_embeddings(floats, precision="int8", ranges=ranges.array))
    assert manifest["bytes_per_vector"] == 64 and manifest["settings"]["calibration"] == ranges.digest()
    print(f"int8 shards: ratio {shard_bytes(out) / shard_bytes(float_run):.3f} of float32")
    assert shard_bytes(out) / shard_bytes(float_run) < 0.45

    # queries with the corpus's ranges, in file mode: the same quantizer, the same buckets
    queries = tmp_path / "queries.txt"
    queries.write_text("garden river\nanchor basket cactus\n", encoding="utf-8")
    assert run_cli(folder, "-i", queries, "-o", tmp_path / "q.safetensors", "--precision", "int8",
                   "--calibration", out / ".diffembed-manifest.json", "--prompt-name", "query") == 0
    from safetensors.numpy import load_file

    query_floats = encode(load_encoder(str(folder), device="cpu"), ["garden river", "anchor basket cactus"],
                          prompt_name="query")
    assert np.array_equal(load_file(str(tmp_path / "q.safetensors"))["embeddings"],
                          quantize_embeddings(query_floats, precision="int8", ranges=ranges.array))

    # the same command resumes (every shard kept); another truncation is refused by name
    result = encode_corpus(str(folder), source, out, shard_size=200, title_field="title", precision="int8",
                           calibration_rows=100, device="cpu")
    assert result.computed == []
    capsys.readouterr()
    assert run_cli(folder, "-i", source, "-o", f"{out}/", "--shard-size", 200, "--title-field", "title",
                   "--precision", "int8", "--calibration-rows", 100, "--truncate-dim", 32) == 2
    assert "truncate dim null, this run asks for 32" in capsys.readouterr().err


def test_refusals_before_any_shard(folder, tiny_folders, source, tmp_path, capsys):
    assert run_cli(folder, "-i", source, "-o", f"{tmp_path / 'a'}/", "--dtype", "float16", "--precision", "binary") == 2
    assert "--dtype float16 cannot hold binary vectors" in capsys.readouterr().err
    assert run_cli(folder, "-i", source, "-o", f"{tmp_path / 'b'}/", "--truncate-dim", 100) == 2
    assert "larger than the model's embedding dimension 64" in capsys.readouterr().err
    assert run_cli(folder, "-i", source, "-o", f"{tmp_path / 'c'}/", "--truncate-dim", 12, "--precision", "binary") == 2
    assert "12 is not a multiple of 8" in capsys.readouterr().err
    other = tiny_folders.copy(tmp_path / "other", **MODEL)
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", " }", 1))  # other files
    sample = np.random.default_rng(0).standard_normal((20, 64))  # unit vectors, as a model's embeddings are
    ranges = compact.calibrate(sample / np.linalg.norm(sample, axis=1, keepdims=True),
                               {"model": str(other), "revision": None, "model_sha256": "0" * 64})
    compact.save_calibration(ranges, tmp_path / "other.json")
    capsys.readouterr()
    assert run_cli(folder, "-i", source, "-o", f"{tmp_path / 'd'}/", "--precision", "int8",
                   "--calibration", tmp_path / "other.json") == 2
    assert ("belong to another model" if SCALAR_OK else "sentence-transformers >= 5.7") in capsys.readouterr().err
    assert not any((tmp_path / name).exists() and any((tmp_path / name).glob("part-*")) for name in "abcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_scalar
def test_killed_int8_run_resumes_and_torchrun_writes_exactly_what_one_process_writes(folder, tmp_path):
    rows = corpus_rows(1200, seed=8)
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    straight = tmp_path / "straight"
    encode_corpus(str(folder), source, straight, shard_size=300, precision="int8", calibration_rows=200,
                  max_tokens_per_batch=1500, device="cpu")
    args = ["encode", str(folder), "-i", str(source), "--shard-size", "300", "--precision", "int8",
            "--calibration-rows", "200", "--max-tokens-per-batch", "1500", "--no-progress"]

    # SIGKILL in the middle of shard 2 (after the ranges were computed and shards 0 and 1 written), then resume
    out = tmp_path / "killed"
    (tmp_path / "mode.json").write_text(json.dumps({"kill_in_shard": 2}))
    first = launch([str(DISTRIBUTED), str(tmp_path / "mode.json"), *args, "-o", f"{out}/"])
    assert first.returncode != 0, first.stdout[-3000:]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    opening = json.loads((out / ".diffembed-manifest.json").read_text())
    assert not opening["complete"] and opening["calibration"] is not None
    result = encode_corpus(str(folder), source, out, shard_size=300, precision="int8", calibration_rows=200,
                           max_tokens_per_batch=1500, device="cpu")
    assert result.computed == [2, 3]
    assert compact.load_calibration(out).digest() == compact.load_calibration(straight).digest()
    assert codes(out)[0] == codes(straight)[0] and np.array_equal(codes(out)[1], codes(straight)[1])

    # two torchrun ranks, int8 and binary: rank 0's ranges on every rank, the same codes as one process
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    ranks = tmp_path / "ranks"
    result = launch([*torchrun, "-m", "diffembed_hf", *args, "-o", f"{ranks}/"])
    assert result.returncode == 0, result.stdout[-5000:]
    assert codes(ranks)[0] == codes(straight)[0] and np.array_equal(codes(ranks)[1], codes(straight)[1])
    assert json.loads((ranks / ".diffembed-manifest.json").read_text())["calibration"] == \
        json.loads((straight / ".diffembed-manifest.json").read_text())["calibration"]


@pytest.mark.slow
def test_torchrun_binary_equals_one_process(folder, tmp_path):
    rows = corpus_rows(900, seed=9)
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    single = tmp_path / "single"
    encode_corpus(str(folder), source, single, shard_size=300, precision="binary", truncate_dim=32, device="cpu")
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    ranks = tmp_path / "ranks"
    result = launch([*torchrun, "-m", "diffembed_hf", "encode", str(folder), "-i", str(source), "-o", f"{ranks}/",
                     "--shard-size", "300", "--precision", "binary", "--truncate-dim", "32", "--no-progress"])
    assert result.returncode == 0, result.stdout[-5000:]
    (ids, bits), (single_ids, single_bits) = codes(ranks), codes(single)
    assert ids == single_ids == [r["_id"] for r in rows] and np.array_equal(bits, single_bits)
    floats = encode(load_encoder(str(folder), device="cpu", truncate_dim=32), [r["text"]
                                                                               for r in rows[:50]])
    assert np.array_equal(bits[:50], quantize_embeddings(floats, precision="binary"))
