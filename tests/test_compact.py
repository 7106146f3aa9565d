"""Compact embeddings (compact.py) against sentence-transformers on the same vectors, and where they leave the project:
`encode` (Python and file mode), with the refusals. Corpus mode and evaluation: corpus/test_compact_corpus.py,
evaluation/test_compact_evaluation.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentence_transformers
from helpers.corpus import MODEL
from sentence_transformers import SentenceTransformer, quantize_embeddings

from diffembed_hf import compact
from diffembed_hf.cli import main as cli_main
from diffembed_hf.compact import CalibrationMismatch, Compaction, CompactError
from diffembed_hf.encoding import encode, load_encoder
from diffembed_hf.sentence_transformer import write_sentence_transformer_files

ST_VERSION = tuple(int(p) for p in sentence_transformers.__version__.split(".")[:2])
SCALAR_OK = ST_VERSION >= compact.SCALAR_MIN_SENTENCE_TRANSFORMERS
needs_scalar = pytest.mark.skipif(not SCALAR_OK, reason="int8/uint8 need sentence-transformers >= 5.7")
TEXTS = ["how do plants make energy?", "Photosynthesis converts light into chemical energy.", "", "短い文",
         "a longer text " * 30, "binary vectors keep one bit per dimension", "x"]
IDENTITY = {"model": "/models/a", "revision": None, "model_sha256": "a" * 64}  # what calibration ranges name


# CI reruns it on the oldest transformers / sentence-transformers
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.versions]


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)  # hidden size 64


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# --- the vector transforms against sentence-transformers ----------------------------------------------------------

@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_codes_are_bit_identical_to_sentence_transformers_and_to_packbits(precision):
    vectors = unit_rows(300, 64)
    ours = compact.quantize(vectors, precision)
    theirs = quantize_embeddings(vectors, precision=precision)
    assert ours.dtype == theirs.dtype and ours.shape == (300, 8)
    assert np.array_equal(ours, theirs)
    # an independent computation of the layout: np.packbits of the signs, first dimension in the highest bit
    packed = np.packbits(vectors > 0, axis=-1)
    assert np.array_equal(compact.as_ubinary(ours, precision), packed)
    assert (packed[:, 0] >> 7 == (vectors[:, 0] > 0)).all()
    flipped = vectors.copy()
    flipped[:, 5] *= -1  # control: one dimension's sign flipped changes exactly that bit in every row
    assert (compact.hamming_distances(compact.as_ubinary(compact.quantize(flipped, precision), precision),
                                      packed).diagonal() == 1).all()


@needs_scalar
@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_scalar_codes_equal_sentence_transformers_with_the_same_ranges(precision):
    corpus, queries = unit_rows(500, 64, seed=1), unit_rows(40, 64, seed=2)
    ranges = compact.calibrate(corpus[::5], IDENTITY)  # a sample of the corpus
    assert np.array_equal(ranges.minimum, corpus[::5].min(axis=0))
    for vectors in (corpus, queries):  # queries fall partly outside the corpus sample's ranges: clipped, not wrapped
        ours = compact.quantize(vectors, precision, ranges)
        assert ours.dtype == np.dtype(precision)
        assert np.array_equal(ours, quantize_embeddings(vectors, precision=precision,
                                                        calibration_embeddings=corpus[::5]))
        assert np.array_equal(ours, quantize_embeddings(vectors, precision=precision, ranges=ranges.array))
    # independently: the bucket index floor((x - min) / step), clipped to [0, 255], less 128 for int8
    steps = (ranges.maximum - ranges.minimum) / 255
    buckets = np.clip(np.floor((queries - ranges.minimum) / steps), 0, 255)
    expected = (buckets - 128 if precision == "int8" else buckets).astype(precision)
    assert np.array_equal(compact.quantize(queries, precision, ranges), expected)
    other = compact.calibrate(queries, IDENTITY)  # control: other ranges give other codes
    assert not np.array_equal(compact.quantize(corpus, precision, other), compact.quantize(corpus, precision, ranges))


@pytest.mark.skipif(SCALAR_OK, reason="this sentence-transformers clips: int8 is allowed")
def test_scalar_codes_are_refused_where_sentence_transformers_would_wrap_them():
    with pytest.raises(CompactError, match="sentence-transformers >= 5.7"):
        compact.quantize(unit_rows(10, 64), "int8", compact.calibrate(unit_rows(10, 64), IDENTITY))


def test_bytes_per_vector():
    # a Dream-7B vector (3,584 dimensions): 14 KB in float32, as the issue counts it
    assert compact.bytes_per_vector(3584, "float32") == 14336
    assert compact.bytes_per_vector(3584, "float16") == 7168
    assert compact.bytes_per_vector(3584, "int8") == compact.bytes_per_vector(3584, "uint8") == 3584
    assert compact.bytes_per_vector(3584, "binary") == compact.bytes_per_vector(3584, "ubinary") == 448
    assert Compaction(256, "binary").bytes_per_vector(3584) == 32


def test_binary_scores_are_hamming_distances_and_rescoring_follows_the_recipe():
    docs, queries = unit_rows(200, 64, seed=3), unit_rows(12, 64, seed=4)
    codes = compact.quantize(docs, "ubinary")
    scores = compact.compact_scores(queries, codes, Compaction(precision="ubinary"))
    # independent Hamming distance: unpack both sides' sign bits and count the differences
    hamming = ((queries > 0)[:, None, :] != (docs > 0)[None, :, :]).sum(-1)
    assert np.array_equal(scores, 1 - 2 * hamming / 64)
    # the dequantized vectors' cosine is the same number, so any cosine scorer (mteb) ranks by Hamming distance
    signs_q = compact.dequantize(compact.quantize(queries, "binary"), "binary")
    signs_d = compact.dequantize(codes, "ubinary")
    assert np.array_equal(signs_q @ signs_d.T / 64, scores)

    rescored = compact.compact_scores(queries, codes, Compaction(precision="ubinary", rescore=20))
    for q in range(len(queries)):
        candidates = sorted(range(200), key=lambda d: (hamming[q, d], d))[:20]
        by_float = sorted(candidates, key=lambda d: -float(queries[q] @ (docs[d] > 0)))  # float query . {0,1} bits
        assert list(np.argsort(-rescored[q], kind="stable")[:20]) == by_float
        rest = np.argsort(-rescored[q], kind="stable")[20:]
        assert set(rest).isdisjoint(candidates)
        assert list(rest) == sorted(rest, key=lambda d: (hamming[q, d], d))  # the others keep their Hamming order
    assert not np.array_equal(np.argsort(-rescored, axis=1)[:, :10], np.argsort(-scores, axis=1, kind="stable")[:, :10])


@needs_scalar
def test_scalar_scores_are_cosines_of_the_bucket_centres():
    docs, queries = unit_rows(100, 64, seed=5), unit_rows(5, 64, seed=6)
    ranges = compact.calibrate(docs, IDENTITY)
    codes = compact.quantize(docs, "int8", ranges)
    scores = compact.compact_scores(queries, codes, Compaction(precision="int8", calibration=ranges))
    step = (ranges.maximum - ranges.minimum) / 255
    centres_d = ranges.minimum + (codes.astype(np.float64) + 128 + 0.5) * step
    centres_q = ranges.minimum + (compact.quantize(queries, "uint8", ranges).astype(np.float64) + 0.5) * step
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(scores, unit(centres_q) @ unit(centres_d).T, rtol=0, atol=1e-6)
    # near the float cosines (clipped queries) ...
    np.testing.assert_allclose(scores, queries @ docs.T, rtol=0, atol=0.05)
    assert np.abs(scores - queries @ docs.T).max() > 1e-4  # ... but not them


# --- encode (Python API) ----------------------------------------------------------------------------------------

def test_truncation_equals_sentence_transformers_truncate_dim(folder):
    model = load_encoder(str(folder), device="cpu", truncate_dim=24)
    ours = encode(model, TEXTS)
    peer = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", truncate_dim=24)
    expected = peer.encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), 24)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    plain = peer.encode(TEXTS)  # control: sentence-transformers' own truncate_dim does not renormalise
    assert np.abs(np.linalg.norm(plain[[0, 1, 3, 4]], axis=1) - 1).min() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(ours[[0, 1, 3, 4]], axis=1), 1, atol=1e-6)
    full = encode(load_encoder(str(folder), device="cpu"), TEXTS)  # the first 24 of the full vector, renormalised
    np.testing.assert_allclose(ours[:2], full[:2, :24] / np.linalg.norm(full[:2, :24], axis=1, keepdims=True),
                               rtol=0, atol=1e-6)


def test_precisions_through_encode_equal_sentence_transformers_on_the_same_vectors(folder):
    model = load_encoder(str(folder), device="cpu", truncate_dim=32)
    floats = encode(model, TEXTS)
    assert np.array_equal(encode(model, TEXTS, precision="binary"), quantize_embeddings(floats, precision="binary"))
    assert np.array_equal(encode(model, TEXTS, precision="float16"), floats.astype(np.float16))
    assert encode(model, [], precision="ubinary").shape == (0, 4)
    if SCALAR_OK:
        ranges = compact.calibrate(floats, IDENTITY)
        assert np.array_equal(encode(model, TEXTS, precision="uint8", calibration=ranges),
                              quantize_embeddings(floats, precision="uint8", ranges=ranges.array))
        with pytest.raises(CompactError, match="calibration ranges"):
            encode(model, TEXTS, precision="int8")  # no ranges: refused, never computed from the texts at hand
        with pytest.raises(CalibrationMismatch, match="for 32 dimensions"):
            encode(load_encoder(str(folder), device="cpu"), TEXTS, precision="int8", calibration=ranges)


def test_stored_truncate_dim_reaches_sentence_transformers_users_and_load_encoder(folder, tmp_path):
    import shutil

    stored = shutil.copytree(folder, tmp_path / "stored")
    write_sentence_transformer_files(stored, max_seq_length=96, truncate_dim=16)
    assert json.loads((stored / "config_sentence_transformers.json").read_text())["truncate_dim"] == 16
    ours = load_encoder(str(stored), device="cpu")
    assert ours.truncate_dim == 16 and encode(ours, TEXTS).shape == (len(TEXTS), 16)
    if ST_VERSION >= (5, 4):  # sentence-transformers reads truncate_dim from the folder since 5.4
        plain = SentenceTransformer(str(stored), trust_remote_code=True, device="cpu").encode(TEXTS)
        assert plain.shape == (len(TEXTS), 16)
    assert load_encoder(str(folder), device="cpu").truncate_dim is None  # control: a folder without it


# --- refusals ---------------------------------------------------------------------------------------------------

def test_refusals_name_the_problem(folder, tmp_path):
    with pytest.raises(CompactError, match="truncate_dim 65 is larger than the model's embedding dimension 64"):
        load_encoder(str(folder), device="cpu", truncate_dim=65)
    with pytest.raises(CompactError, match="not a multiple of 8"):
        encode(load_encoder(str(folder), device="cpu", truncate_dim=20), TEXTS, precision="binary")
    with pytest.raises(CompactError, match="not one of"):
        compact.quantize(unit_rows(3, 8), "int4")
    ranges = compact.calibrate(unit_rows(10, 64), IDENTITY)
    with pytest.raises(CalibrationMismatch, match="another model"):
        ranges.check({"model": "/models/b", "revision": None, "model_sha256": "b" * 64}, 64)
    ranges.check({"model": "/moved/a", "revision": None, "model_sha256": "a" * 64}, 64)  # same files elsewhere: fine
    with pytest.raises(CalibrationMismatch, match="for 64 dimensions"):
        ranges.check(IDENTITY, 32)
    with pytest.raises(CompactError, match="rescoring applies to binary"):
        Compaction(precision="float16", rescore=10)
    path = tmp_path / "ranges.json"
    compact.save_calibration(ranges, path)
    loaded = compact.load_calibration(path)  # the round trip through JSON is exact
    assert loaded.digest() == ranges.digest() and np.array_equal(loaded.array, ranges.array)
    (tmp_path / "bad.json").write_text(json.dumps({**ranges.to_dict(), "min": [0.0] * 63}))
    with pytest.raises(CompactError, match="64 finite"):
        compact.load_calibration(tmp_path / "bad.json")


def run_encode(*args):
    try:
        return cli_main(["encode", *map(str, args), "--device", "cpu", "--no-progress"])
    except SystemExit as exit_:
        return exit_.code


def test_file_mode_writes_the_codes_and_refuses_with_one_line(folder, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t for t in TEXTS if t) + "\n", encoding="utf-8")
    model = load_encoder(str(folder), device="cpu", truncate_dim=32)
    floats = encode(model, [t for t in TEXTS if t])
    assert run_encode(folder, "-i", texts, "-o", tmp_path / "bits.npy", "--truncate-dim", 32,
                      "--precision", "ubinary") == 0
    assert np.array_equal(np.load(tmp_path / "bits.npy"), quantize_embeddings(floats, precision="ubinary"))
    assert "(ubinary, 4 values per row)" in capsys.readouterr().err

    assert run_encode(folder, "-i", texts, "-o", tmp_path / "wide.npy", "--truncate-dim", 65) == 2
    assert "truncate_dim 65 is larger than the model's embedding dimension 64" in capsys.readouterr().err
    other = compact.calibrate(unit_rows(10, 32), {"model": "elsewhere", "revision": None, "model_sha256": "c" * 64})
    compact.save_calibration(other, tmp_path / "other.json")
    capsys.readouterr()
    assert run_encode(folder, "-i", texts, "-o", tmp_path / "q.npy", "--truncate-dim", 32, "--precision", "int8",
                      "--calibration", tmp_path / "other.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffembed encode: error: ") and len(err.strip().splitlines()) == 1
    assert ("another model" in err) if SCALAR_OK else ("sentence-transformers >= 5.7" in err)
    assert not (tmp_path / "q.npy").exists() and not (tmp_path / "wide.npy").exists()
