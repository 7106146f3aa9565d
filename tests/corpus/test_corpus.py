"""Corpus encoding in one process: the vectors against sentence-transformers (an independent peer), the shard
folder as other tools read it, resume and refusals, bad input, and `embed_texts` over two worker processes."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.corpus import MAX_LEN, MODEL, corpus_rows, read_output, write_jsonl
from sentence_transformers import SentenceTransformer

from diffembed_hf.cli import main as cli_main
from diffembed_hf.corpus import CorpusError, embed_texts, encode_corpus, join_title
from diffembed_hf.encoding import load_encoder
from diffembed_hf.sentence_transformer import DEFAULT_QUERY_PROMPT, write_sentence_transformer_files

ROWS = corpus_rows(600, seed=1)
TEXTS = ["", " ", "短い文", "word " * 200, *(join_title(r["title"], r["text"]) for r in ROWS)]


# CI reruns it on the oldest transformers / sentence-transformers
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.versions]


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


@pytest.fixture(scope="module")
def peer(folder):
    """sentence-transformers itself, loaded the way a user loads a DiffEmbed folder."""
    return SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


@pytest.fixture(scope="module")
def encoder(folder):
    return load_encoder(str(folder), device="cpu")


# --- the vectors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [None, DEFAULT_QUERY_PROMPT], ids=["no-prompt", "query-prompt"])
def test_embed_texts_equals_sentence_transformers(encoder, peer, prompt):
    expected = peer.encode(TEXTS, prompt=prompt, batch_size=16)
    got = embed_texts(encoder, TEXTS, prompt=prompt, max_tokens_per_batch=1000)  # many packed batches
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.allclose(got[0], 0) == (prompt is None)  # an empty text without prompt: a zero vector, as in ST
    # control: another prompt gives other vectors, so the comparison above can fail
    other = embed_texts(encoder, TEXTS[4:20], prompt="Represent this passage:\n", show_progress_bar=False)
    assert np.abs(other - expected[4:20]).max() > 1e-2


def test_prompt_left_out_of_the_mean_equals_sentence_transformers(tiny_folders, tmp_path):
    folder = tiny_folders.copy(tmp_path / "model", **MODEL)
    write_sentence_transformer_files(folder, max_seq_length=MAX_LEN, include_prompt=False)
    peer = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    expected = peer.encode(TEXTS[:80], prompt_name="query")
    got = embed_texts(str(folder), TEXTS[:80], prompt_name="query", devices=["cpu"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    with_prompt = embed_texts(str(folder), TEXTS[4:80], prompt=DEFAULT_QUERY_PROMPT, max_seq_length=MAX_LEN)
    assert with_prompt.shape == (76, 64)


def test_embed_texts_truncates_with_one_warning(encoder, peer, caplog):
    long = "many words here " * 100
    with caplog.at_level(logging.WARNING, logger="diffembed_hf.corpus"):
        got = embed_texts(encoder, [long, "short", long])
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3" in warnings[0]
    np.testing.assert_allclose(got, peer.encode([long, "short", long]), rtol=0, atol=1e-5)


def test_embed_texts_on_two_worker_processes_equals_one(encoder, folder):
    one = embed_texts(encoder, TEXTS, max_tokens_per_batch=2000)
    two = embed_texts(str(folder), TEXTS, devices=["cpu", "cpu"], max_tokens_per_batch=2000)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="folder or Hub id"):
        embed_texts(encoder, TEXTS, devices=["cpu", "cpu"])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embed_texts(encoder, ["ok", None])


# --- the shard folder ------------------------------------------------------------------------------------------

def run_cli(folder, source, out, *extra):
    """The exit status of `diffembed encode ...`; argparse's own refusals (bad numbers) arrive as SystemExit."""
    try:
        return cli_main(["encode", str(folder), "-i", str(source), "-o", f"{out}/", "--device", "cpu",
                         "--no-progress", *extra])
    except SystemExit as exit_:
        return exit_.code


def test_corpus_folder_is_read_by_pyarrow_and_datasets_and_equals_sentence_transformers(folder, peer, tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    out = tmp_path / "out"
    assert run_cli(folder, source, out, "--title-field", "title", "--shard-size", "250", "--prompt-name", "query") == 0
    assert sorted(p.name for p in out.iterdir()) == [".diffembed-manifest.json", "part-00000.parquet",
                                                      "part-00001.parquet", "part-00002.parquet"]
    ids, vectors = read_output(out)
    assert ids == [r["_id"] for r in ROWS]
    expected = peer.encode([join_title(r["title"], r["text"]) for r in ROWS], prompt=DEFAULT_QUERY_PROMPT)
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.field("id").type == pa.string() and schema.field("embedding").type == pa.list_(pa.float32(), 64)

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    assert loaded["id"] == ids and np.allclose(np.array(loaded["embedding"]), vectors)

    manifest = json.loads((out / ".diffembed-manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 600 and manifest["dim"] == 64
    assert manifest["prompt"] == DEFAULT_QUERY_PROMPT and manifest["normalized"] and manifest["dtype"] == "float32"
    assert manifest["max_seq_length"] == MAX_LEN and manifest["skipped_rows"] == 0
    assert [s["rows"] for s in manifest["shards"]] == [250, 250, 100]
    import hashlib

    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()

    # float16 output, the same corpus as parquet + csv files in a folder, ids from `id`: the same vectors
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    table = pa.Table.from_pylist([{"id": r["_id"], "body": r["text"], "title": r["title"]} for r in ROWS[:300]])
    pq.write_table(table, mixed / "a.parquet", row_group_size=64)
    with open(mixed / "b.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["id", "body", "title"])
        writer.writeheader()
        writer.writerows({"id": r["_id"], "body": r["text"], "title": r["title"]} for r in ROWS[300:])
    half = tmp_path / "half"
    assert run_cli(folder, mixed, half, "--field", "body", "--title-field", "title", "--shard-size", "250",
                   "--prompt-name", "query", "--dtype", "float16") == 0
    half_ids, half_vectors = read_output(half)
    assert pq.read_schema(half / "part-00000.parquet").field("embedding").type == pa.list_(pa.float16(), 64)
    assert half_ids == ids
    np.testing.assert_allclose(half_vectors, vectors, rtol=0, atol=1e-3)  # float16 rounding of unit vectors
    assert np.abs(half_vectors - vectors).max() > 0  # really stored as float16

    # a streamed `datasets` dataset (what a Hub id is read as): the same rows, the same shards
    streamed = datasets.Dataset.from_list(ROWS).to_iterable_dataset(num_shards=3)
    result = encode_corpus(str(folder), streamed, tmp_path / "streamed", title_field="title", shard_size=250,
                           prompt_name="query", device="cpu")
    assert result.shards == 3 and read_output(tmp_path / "streamed")[0] == ids
    np.testing.assert_allclose(read_output(tmp_path / "streamed")[1], vectors, rtol=0, atol=1e-6)


def test_rerun_resumes_and_other_settings_are_refused_by_name(folder, tiny_folders, tmp_path, capsys):
    source = write_jsonl(tmp_path / "corpus.jsonl", ROWS[:200])
    out = tmp_path / "out"
    assert run_cli(folder, source, out, "--shard-size", "80") == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    result = encode_corpus(str(folder), source, out, shard_size=80, device="cpu")
    assert result.computed == [] and result.shards == 3  # every shard verified and kept
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before

    capsys.readouterr()
    assert run_cli(folder, source, out, "--shard-size", "80", "--prompt-name", "query") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffembed encode: error: ") and "prompt" in err and "--overwrite" in err
    other_model = tiny_folders.copy(tmp_path / "other", **MODEL)
    (other_model / "config.json").write_text((other_model / "config.json").read_text().replace("}", ' }', 1))
    assert run_cli(other_model, source, out, "--shard-size", "80") == 2
    assert "model" in capsys.readouterr().err
    assert run_cli(folder, source, out, "--shard-size", "100") == 2
    assert "shard size 80, this run asks for 100" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before  # refused: nothing touched

    # --overwrite: the folder then holds exactly what a fresh run with the new settings writes
    assert run_cli(folder, source, out, "--shard-size", "150", "--prompt-name", "query", "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert run_cli(folder, source, fresh, "--shard-size", "150", "--prompt-name", "query") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir()) == [
        ".diffembed-manifest.json", "part-00000.parquet", "part-00001.parquet"]
    (ids, vectors), (fresh_ids, fresh_vectors) = read_output(out), read_output(fresh)
    assert ids == fresh_ids and np.array_equal(vectors, fresh_vectors)

    # a folder that is not ours is never touched
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert run_cli(folder, source, stranger) == 2
    assert "not empty" in capsys.readouterr().err and (stranger / "notes.txt").exists()


def test_bad_input_is_named_or_skipped_and_counted(folder, tmp_path, capsys):
    rows = [dict(r) for r in ROWS[:30]]
    rows[7]["text"] = None
    rows[12]["text"] = 42
    del rows[20]["text"]
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli(folder, source, out) == 2
    err = capsys.readouterr().err
    assert f"{source} line 8: text field 'text' is missing" in err and "--skip-bad-rows" in err
    assert not out.exists() or not list(out.glob("part-*"))

    assert run_cli(folder, source, out, "--skip-bad-rows", "--shard-size", "10") == 0
    manifest = json.loads((out / ".diffembed-manifest.json").read_text())
    assert manifest["rows"] == 27 and manifest["skipped_rows"] == 3
    assert f"{source} line 13: text field 'text' is int (42), expected a string" in manifest["skipped_examples"]
    assert [s["rows"] for s in manifest["shards"]] == [9, 9, 9]  # shard k keeps input rows 10k..10k+9
    ids, _ = read_output(out)
    assert ids == [r["_id"] for i, r in enumerate(rows) if i not in (7, 12, 20)]

    duplicates = [dict(r) for r in ROWS[:30]]
    duplicates[25]["_id"] = duplicates[3]["_id"]
    assert run_cli(folder, write_jsonl(tmp_path / "dup.jsonl", duplicates), tmp_path / "dup") == 2
    assert f"duplicate id '{duplicates[3]['_id']}'" in capsys.readouterr().err

    (tmp_path / "empty.jsonl").write_text("\n")
    assert run_cli(folder, tmp_path / "empty.jsonl", tmp_path / "empty") == 2
    assert "the corpus is empty" in capsys.readouterr().err
    all_bad = write_jsonl(tmp_path / "allbad.jsonl", [{"_id": "a", "text": 1}])
    assert run_cli(folder, all_bad, tmp_path / "allbad", "--skip-bad-rows") == 2
    assert "the corpus is empty: 1 rows, none to embed" in capsys.readouterr().err

    assert run_cli(folder, source, tmp_path / "zero", "--shard-size", "0") == 2
    assert "argument --shard-size: must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()  # refused before any work
    assert run_cli(folder, "no-such-org/no-such-corpus", tmp_path / "hub") == 2  # offline: no Hub dataset
    assert "no-such-org/no-such-corpus is neither a local file or folder nor a loadable Hub dataset" in \
        capsys.readouterr().err
    assert run_cli(folder, source, tmp_path / "nofield", "--field", "body") == 2
    assert "no field 'body' (fields: _id, text, title); choose one with --field" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="no field 'body'"):
        pq.write_table(pa.Table.from_pylist(ROWS[:5]), tmp_path / "t.parquet")
        encode_corpus(str(folder), tmp_path / "t.parquet", tmp_path / "pq", field="body", device="cpu")
