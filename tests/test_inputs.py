"""Every input read as the user meant, the same way by `diffembed encode` file mode, corpus mode and evaluate's
BEIR reader: byte-order marks, non-UTF-8 bytes, long CSV fields, lone surrogates, folders of any input file
(compressed, upper-case, .ndjson / .jsonlines), resume inside a compressed file, missing paths, qrels problems,
and advice for a mistyped --field that works. Expected texts come from the test's own records; vectors are
compared with `encode` of those texts."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.corpus import MODEL, corpus_rows, read_output, write_jsonl

from diffembed_hf.cli import main
from diffembed_hf.corpus import CorpusSource, encode_corpus, iter_rows
from diffembed_hf.encoding import encode, load_encoder
from diffembed_hf.errors import DiffembedError
from diffembed_hf.evaluation.local import beir_task

BOM = b"\xef\xbb\xbf"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


@pytest.fixture(scope="module")
def encoder(folder):
    return load_encoder(str(folder), device="cpu")


def cli(capsys, *argv) -> tuple[int, str]:
    """`diffembed ARGV` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def corpus_mode(capsys, folder, source, out, *extra) -> tuple[int, str]:
    return cli(capsys, "encode", folder, "-i", source, "-o", f"{out}/", "--device", "cpu", "--no-progress", *extra)


def file_mode(capsys, folder, source, out, *extra) -> tuple[int, str]:
    return cli(capsys, "encode", folder, "-i", source, "-o", out, "--device", "cpu", "--no-progress", *extra)


def write_beir(root: Path, corpus: bytes, queries: bytes, qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_bytes(corpus)
    (root / "queries.jsonl").write_bytes(queries)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels, encoding="utf-8")
    return root


def beir_contents(root: Path) -> tuple[dict, dict, dict]:
    """What mteb gets from a BEIR folder: {id: text} of corpus and queries, and the qrels."""
    task = beir_task(root)
    task.load_data()
    corpus = {row["id"]: row["text"] for row in task.corpus["test"]}
    queries = {row["id"]: row["text"] for row in task.queries["test"]}
    return corpus, queries, task.relevant_docs["test"]


def manifest_of(out: Path) -> dict:
    """The corpus folder's manifest."""
    path = out / ".diffembed-manifest.json"
    return json.loads(path.read_text())


def jsonl_bytes(records: list[dict], newline: str = "\n") -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + newline for r in records).encode("utf-8")


# --- one file, three readers ------------------------------------------------------------------------------------

def test_one_json_lines_file_reads_the_same_in_file_mode_corpus_mode_and_beir(folder, encoder, tmp_path, capsys):
    records = [{"_id": "a", "text": "first\u2028still the first"}, {"_id": "b", "text": "tab\there\x0cand feed"},
               {"_id": "c", "text": "naïve 日本語 \U0001f600"}, {"_id": "d", "text": "  spaced  "}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    raw = BOM + "\r\n".join(lines[:2] + [""] + lines[2:]).encode("utf-8") + b"\r\n\r\n"  # CRLF, blank lines
    texts = [r["text"] for r in records]
    assert len(raw.decode("utf-8-sig").splitlines()) != len(records)  # the control: str.splitlines miscounts
    source = tmp_path / "x.jsonl"
    source.write_bytes(raw)
    expected = encode(encoder, texts)

    status, err = file_mode(capsys, folder, source, tmp_path / "e.npy")
    assert status == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, rtol=0, atol=1e-5)

    status, err = corpus_mode(capsys, folder, source, tmp_path / "out")
    assert status == 0, err
    ids, vectors = read_output(tmp_path / "out")
    assert ids == ["a", "b", "c", "d"]
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)

    qrels = "".join(f"{r['_id']}\t{r['_id']}\t1\n" for r in records)
    corpus, queries, _ = beir_contents(write_beir(tmp_path / "beir", raw, raw, qrels))
    assert corpus == queries == {r["_id"]: r["text"] for r in records}


# --- CSV ----------------------------------------------------------------------------------------------------------

def test_a_csv_byte_order_mark_stays_out_of_the_first_column_name(folder, encoder, tmp_path, capsys):
    source = tmp_path / "bom.csv"
    source.write_bytes(BOM + b'_id,text\r\nx1,hello there\r\nx2,"two\r\nlines"\r\n')
    expected = encode(encoder, ["hello there", "two\r\nlines"])

    status, err = corpus_mode(capsys, folder, source, tmp_path / "out")
    assert status == 0, err
    ids, vectors = read_output(tmp_path / "out")
    assert ids == ["x1", "x2"]  # the `_id` column is found: ids are not the row numbers
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)

    status, err = file_mode(capsys, folder, source, tmp_path / "e.npy")  # file mode reads the text column too
    assert status == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, rtol=0, atol=1e-5)


def test_csv_fields_of_any_length_are_read_whole_and_a_row_with_extra_values_is_not_cut(folder, tmp_path, capsys):
    long_text = "word " * 60_000  # 300,000 characters: over the csv module's default limit of 131,072
    source = tmp_path / "long.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["_id", "text"], ["long", long_text], ["short", "a short text"]])
    assert [(row.id, row.text) for row in iter_rows(CorpusSource(str(source)))] == [
        ("long", long_text), ("short", "a short text")]
    status, err = corpus_mode(capsys, folder, source, tmp_path / "out")
    assert status == 0, err
    assert read_output(tmp_path / "out")[0] == ["long", "short"]

    commas = tmp_path / "commas.csv"
    commas.write_text("_id,text\nx1,one text\nx2,a text, with an unquoted comma\nx3,three\n", encoding="utf-8")
    status, err = corpus_mode(capsys, folder, commas, tmp_path / "commas")
    assert status == 2 and f"{commas} line 3: 3 fields, the header has 2" in err
    status, err = corpus_mode(capsys, folder, commas, tmp_path / "commas", "--skip-bad-rows")
    assert status == 0, err
    assert read_output(tmp_path / "commas")[0] == ["x1", "x3"]
    assert manifest_of(tmp_path / "commas")["skipped_rows"] == 1


# --- decoding and text validation ---------------------------------------------------------------------------------

def test_non_utf8_bytes_are_refused_naming_file_line_and_byte_in_every_reader(folder, tmp_path, capsys):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("_id,text\nx1,un café\nx2,plain\n".encode("latin-1"))
    offset = len(b"_id,text\nx1,un caf")
    status, err = corpus_mode(capsys, folder, latin, tmp_path / "out")
    assert status == 2, err
    assert f"{latin} line 2: not UTF-8 (byte 0xe9 at byte offset {offset}); save the file as UTF-8" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    status, err = corpus_mode(capsys, folder, latin, tmp_path / "out", "--skip-bad-rows")
    assert status == 0, err
    assert read_output(tmp_path / "out")[0] == ["x2"]

    text = tmp_path / "latin.txt"
    text.write_bytes("plain\nun café\n".encode("latin-1"))
    status, err = file_mode(capsys, folder, text, tmp_path / "e.npy")
    assert status == 1 and f"{text} line 2: not UTF-8 (byte 0xe9 at byte offset 12)" in err

    good = jsonl_bytes([{"_id": "q", "text": "fine"}])
    bad = good + '{"_id": "d", "text": "caf\xe9"}\n'.encode("latin-1")
    with pytest.raises(DiffembedError, match=r"corpus.jsonl line 2: not UTF-8 \(byte 0xe9"):
        beir_task(write_beir(tmp_path / "beir", bad, good, "q\tq\t1\n"))


def test_lone_surrogates_are_refused_or_skipped_never_a_crash(folder, encoder, tmp_path, capsys):
    # json.dumps escapes them as "\ud800": valid JSON that no UTF-8 file, parquet column or tokenizer can hold
    records = [{"_id": "ok-1", "text": "fine"}, {"_id": "bad-text", "text": "broken \ud800 text"},
               {"_id": "bad-\udc00-id", "text": "fine too"}, {"_id": "ok-2", "text": "also fine"}]
    source = tmp_path / "s.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="ascii")

    status, err = corpus_mode(capsys, folder, source, tmp_path / "out")
    assert status == 2, err
    assert f"{source} line 2: text field 'text' holds a lone surrogate U+D800 at character 7" in err
    status, err = corpus_mode(capsys, folder, source, tmp_path / "out", "--skip-bad-rows")
    assert status == 0, err
    manifest = manifest_of(tmp_path / "out")
    assert manifest["skipped_rows"] == 2 and read_output(tmp_path / "out")[0] == ["ok-1", "ok-2"]
    assert any("line 3: id field '_id' holds a lone surrogate U+DC00" in e for e in manifest["skipped_examples"])

    status, err = file_mode(capsys, folder, source, tmp_path / "e.npy")
    assert status == 1 and f"{source} line 2: field 'text' holds a lone surrogate U+D800" in err

    with pytest.raises(DiffembedError, match="corpus.jsonl line 2: text field 'text' holds a lone surrogate"):
        beir_task(write_beir(tmp_path / "beir", source.read_bytes(), jsonl_bytes(records[:1]), "ok-1\tok-1\t1\n"))
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate U\+D800"):
        encode(encoder, ["fine", "broken \ud800 text"])


# --- folders and compressed files ---------------------------------------------------------------------------------

def test_a_folder_input_reads_every_input_file_in_path_order_and_names_the_rest(folder, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)

    def rows(prefix, n):
        return [{"_id": f"{prefix}{i}", "text": f"text {prefix}{i}"} for i in range(n)]

    def csv_bytes(records):
        out = io.StringIO()
        writer = csv.DictWriter(out, ["_id", "text"])
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue().encode("utf-8")

    (data / "a.jsonl").write_bytes(jsonl_bytes(rows("a", 2)))
    (data / "B.NDJSON").write_bytes(jsonl_bytes(rows("b", 1)))
    (data / "c.jsonlines").write_bytes(jsonl_bytes(rows("c", 1)))
    (data / "sub" / "d.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(rows("d", 2))))
    (data / "e.csv.bz2").write_bytes(bz2.compress(csv_bytes(rows("e", 1))))
    (data / "f.CSV.XZ").write_bytes(lzma.compress(csv_bytes(rows("f", 1))))
    pq.write_table(pa.Table.from_pylist(rows("g", 1)), data / "g.Parquet")
    (data / "notes.txt").write_text("not a corpus file")
    (data / "h.parquet.gz").write_bytes(gzip.compress(b"parquet compresses inside the file"))
    (data / ".hidden.jsonl").write_bytes(jsonl_bytes(rows("hidden", 1)))

    status, err = corpus_mode(capsys, folder, data, tmp_path / "out")
    assert status == 0, err
    # sorted by path, folder by folder, in code-point order: upper case first, sub/ after the files beside it
    assert read_output(tmp_path / "out")[0] == ["b0", "a0", "a1", "c0", "e0", "f0", "g0", "d0", "d1"]
    warning = [line for line in err.splitlines() if "not corpus files" in line]
    assert len(warning) == 1 and "h.parquet.gz" in warning[0] and "notes.txt" in warning[0]
    assert "hidden" not in err

    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(jsonl_bytes(rows("t", 200)))[:-40])
    with pytest.raises(DiffembedError, match="truncated.jsonl.gz: cannot be read .the compressed data ends early"):
        list(iter_rows(CorpusSource(str(truncated))))

    upper = write_jsonl(tmp_path / "CORPUS.JSONL", rows("u", 2))
    status, err = corpus_mode(capsys, folder, upper, tmp_path / "upper")
    assert status == 0, err
    assert read_output(tmp_path / "upper")[0] == ["u0", "u1"]


def test_a_resumed_run_inside_a_compressed_corpus_equals_an_uninterrupted_one(folder, tmp_path, capsys, monkeypatch):
    from diffembed_hf.corpus.job import CorpusJob

    source = tmp_path / "corpus.jsonl.gz"
    source.write_bytes(gzip.compress(jsonl_bytes(corpus_rows(60, seed=3))))
    status, err = corpus_mode(capsys, folder, source, tmp_path / "whole", "--shard-size", "10")
    assert status == 0, err

    real_compute = CorpusJob.compute

    def killed_at_shard_3(self, shard, *args, **kwargs):
        if shard == 3:
            raise RuntimeError("killed")
        return real_compute(self, shard, *args, **kwargs)

    monkeypatch.setattr(CorpusJob, "compute", killed_at_shard_3)
    status, _ = corpus_mode(capsys, folder, source, tmp_path / "resumed", "--shard-size", "10")
    assert status == 1 and len(list((tmp_path / "resumed").glob("part-*.parquet"))) == 3
    monkeypatch.setattr(CorpusJob, "compute", real_compute)

    from diffembed_hf import readers

    opens = []

    def counting_open(path, mode="rb"):
        opens.append(Path(path).name)
        return gzip.open(path, mode)

    monkeypatch.setitem(readers.COMPRESSIONS, ".gz", counting_open)
    result = encode_corpus(str(folder), source, tmp_path / "resumed", shard_size=10, device="cpu",
                           show_progress_bar=False)
    assert result.computed == [3, 4, 5]  # started at byte offsets inside the compressed file
    # its first row read before the model loads (a wrong --field is named at once), one pass to scan, one to
    # embed: shard 3 decompresses up to its start, shards 4 and 5 continue where the one before stopped instead of
    # decompressing from the start again (that would be 5 opens)
    assert opens == ["corpus.jsonl.gz"] * 3
    (ids, vectors), (whole_ids, whole_vectors) = read_output(tmp_path / "resumed"), read_output(tmp_path / "whole")
    assert ids == whole_ids == [r["_id"] for r in corpus_rows(60, seed=3)]
    assert np.array_equal(vectors, whole_vectors)


def test_file_mode_reads_compressed_csv_and_parquet_inputs_by_field(folder, encoder, tmp_path, capsys):
    texts = ["one text", "a second, longer text", "third"]
    expected = encode(encoder, texts)
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(("\n".join(texts) + "\n").encode("utf-8")))
    (tmp_path / "t.ndjson.bz2").write_bytes(bz2.compress(jsonl_bytes([{"text": t} for t in texts])))
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["id", "body"], *([i, t] for i, t in enumerate(texts))])
    pq.write_table(pa.Table.from_pylist([{"text": t, "n": i} for i, t in enumerate(texts)]), tmp_path / "t.parquet")
    for name, extra in [("t.txt.gz", []), ("t.ndjson.bz2", []), ("t.csv", ["--field", "body"]), ("t.parquet", [])]:
        out = tmp_path / f"{name}.npy"
        status, err = file_mode(capsys, folder, tmp_path / name, out, *extra)
        assert status == 0, (name, err)
        np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5, err_msg=name)


# --- paths --------------------------------------------------------------------------------------------------------

def test_a_missing_local_path_is_named_as_missing_not_as_a_hub_dataset(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("data/corpus.jsonl", "data/corpus.csv.gz", "data/corpus.NDJSON"):
        status, err = corpus_mode(capsys, folder, missing, tmp_path / "out")
        assert status == 2 and f"{missing}: no such file or folder" in err and "Hub" not in err, err
    status, err = file_mode(capsys, folder, "data/texts.txt", tmp_path / "e.npy")
    assert status == 2 and "--input data/texts.txt: no such file" in err
    status, err = cli(capsys, "evaluate", folder, "--data", "data/beir", "--output", tmp_path / "eval")
    assert status == 2 and "--data data/beir: no such folder" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


# --- BEIR qrels ---------------------------------------------------------------------------------------------------

def small_beir(root: Path, qrels: str, queries: int = 2) -> Path:
    corpus = jsonl_bytes([{"_id": f"d{i}", "title": "", "text": f"document {i}"} for i in range(1, 4)])
    return write_beir(root, corpus, jsonl_bytes([{"_id": f"q{i}", "text": f"query {i}"}
                                                 for i in range(1, queries + 1)]), qrels)


def test_duplicate_qrels_pairs_count_once_or_are_refused_naming_both_lines(tmp_path, caplog):
    single = beir_contents(small_beir(tmp_path / "single", "q1\td1\t1\nq2\td2\t1\n"))[2]
    with caplog.at_level(logging.WARNING, logger="diffembed_hf"):
        repeated = beir_contents(small_beir(tmp_path / "repeated", "q1\td1\t1\nq2\td2\t1\nq1\td1\t1\n"))[2]
    assert repeated == single == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert any("1 lines repeat an earlier" in r.getMessage() for r in caplog.records)
    conflict = small_beir(tmp_path / "conflict", "q1\td1\t1\nq2\td2\t1\nq1\td1\t0\n")
    with pytest.raises(DiffembedError, match=r"test.tsv lines 2 and 4: query-id 'q1' and corpus-id 'd1' twice, "
                                             r"with scores 1 and 0; keep one"):
        beir_task(conflict)


def test_queries_without_qrels_are_named_in_one_warning(tmp_path, caplog):
    root = small_beir(tmp_path / "beir", "q1\td1\t1\nq2\td2\t1\n", queries=4)
    with caplog.at_level(logging.WARNING, logger="diffembed_hf"):
        _, queries, qrels = beir_contents(root)
    assert sorted(queries) == ["q1", "q2", "q3", "q4"] and sorted(qrels) == ["q1", "q2"]
    warnings = [r.getMessage() for r in caplog.records if "no qrels" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 4 queries have no qrels" in warnings[0] and "'q3', 'q4'" in warnings[0]


# --- advice that works --------------------------------------------------------------------------------------------

def test_a_mistyped_field_gets_advice_that_works(folder, tmp_path, capsys):
    rows = [{"_id": f"r{i}", "text": f"text {i}", "title": f"title {i}"} for i in range(6)]
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    for extra, option, name in [(["--field", "body"], "--field", "body"), (["--id-field", "key"], "--id-field", "key"),
                                (["--title-field", "heading"], "--title-field", "heading")]:
        for skip in ([], ["--skip-bad-rows"]):  # skipping would skip every row: the advice is to name a field
            status, err = corpus_mode(capsys, folder, source, tmp_path / "out", *extra, *skip)
            assert status == 2, (extra, skip, err)
            assert f"no field {name!r} (fields: _id, text, title); choose one with {option}" in err, err
            assert "--skip-bad-rows" not in err
    assert not (tmp_path / "out").exists()

    table = tmp_path / "c.csv"
    table.write_text("_id,text\nr0,zero\n", encoding="utf-8")
    status, err = corpus_mode(capsys, folder, table, tmp_path / "out", "--field", "body")
    assert status == 2 and "no field 'body' (fields: _id, text); choose one with --field" in err

    # the control: a field missing from one row in the middle is a bad row, and skipping it works as advised
    holed = [dict(r) for r in rows]
    del holed[3]["text"]
    source = write_jsonl(tmp_path / "holed.jsonl", holed)
    status, err = corpus_mode(capsys, folder, source, tmp_path / "holed")
    assert status == 2 and f"{source} line 4: text field 'text' is missing" in err and "--skip-bad-rows" in err
    status, err = corpus_mode(capsys, folder, source, tmp_path / "holed", "--skip-bad-rows")
    assert status == 0, err
    assert read_output(tmp_path / "holed")[0] == ["r0", "r1", "r2", "r4", "r5"]
