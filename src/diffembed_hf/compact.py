"""Compact embeddings: fewer dimensions (Matryoshka truncation) and fewer bits (float16, int8/uint8, binary).

Every stage that hands out vectors (file and corpus encoding, the Python API, evaluation) calls this module, and
this module calls sentence-transformers for what it already does: `truncate_embeddings` for the cut and
`quantize_embeddings` for int8, uint8, binary and ubinary (the `np.packbits` layout, first dimension in the
highest bit). What is ours is what sentence-transformers leaves to the caller:

- truncation renormalises to unit length (sentence-transformers' `truncate_dim` does not), so dot products of
  truncated vectors are cosines, as for the full ones;
- int8/uint8 need calibration ranges (per-dimension min and max) that the corpus and its queries share. They are
  computed once from a sample of the corpus, stored (the corpus manifest, or a JSON file) with the identity of the
  model and the dimension they belong to, and refused for any other model or dimension;
- scoring: binary vectors are compared by Hamming distance over the packed bits, optionally followed by float
  rescoring of the top candidates (sentence-transformers' `semantic_search_faiss` / `semantic_search_usearch`
  recipe: the float query against the candidates' unpacked bits), and int8/uint8 codes by the cosine of their
  dequantized values (bucket centres);
- bytes per vector, for the tables beside each score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CalibrationMismatch, CompactError, ModelFilesError
from .records import CorpusManifest
from .validation import is_positive_int

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
SCALAR = ("int8", "uint8")  # one byte per dimension, through calibration ranges
PACKED = ("binary", "ubinary")  # one bit per dimension, 8 per byte
CALIBRATION_FORMAT = "diffembed-calibration/1"
DEFAULT_CALIBRATION_ROWS = 10_000  # the sample of the corpus the ranges are computed from
# sentence-transformers before 5.7 neither clips values outside the ranges (a query beyond the corpus's range
# wraps around in the int8 cast) nor floors consistently (int8 codes below the middle round up)
SCALAR_MIN_SENTENCE_TRANSFORMERS = (5, 7)

# bits set in each byte value: Hamming distance over packed bits without numpy 2's bitwise_count
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint16)


# ----------------------------------------------------------------------------------------------------------
# Checks, before any work
# ----------------------------------------------------------------------------------------------------------


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CompactError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision in SCALAR:
        check_scalar_support()
    return precision


def resolve_precision(dtype: str, precision: str | None) -> str:
    """--precision, or --dtype (its float-only predecessor); the two must not disagree: the output has one type."""
    if dtype not in ("float32", "float16"):
        raise CompactError(f"--dtype must be float32 or float16, got {dtype}")
    if precision is None:
        return dtype
    check_precision(precision)
    if dtype != "float32" and dtype != precision:
        raise CompactError(f"--dtype {dtype} cannot hold {precision} vectors: the output has one type; drop --dtype "
                           "(--precision sets it)")
    return precision


def check_scalar_support() -> None:
    """int8/uint8 need a sentence-transformers whose `quantize_embeddings` clips to the ranges."""
    import sentence_transformers

    version = tuple(int(p) for p in sentence_transformers.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < SCALAR_MIN_SENTENCE_TRANSFORMERS:
        raise CompactError(
            f"int8/uint8 need sentence-transformers >= {'.'.join(map(str, SCALAR_MIN_SENTENCE_TRANSFORMERS))}: "
            f"the installed {sentence_transformers.__version__}'s quantize_embeddings does not clip values outside the "
            "calibration ranges (a query beyond the corpus's range would wrap around); "
            "pip install -U 'sentence-transformers>=5.7'")


def check_truncate_dim(truncate_dim: int | None, width: int) -> int | None:
    """`truncate_dim` as given, if it is a whole number of dimensions the model has."""
    if truncate_dim is None:
        return None
    if not is_positive_int(truncate_dim):
        raise CompactError(f"truncate_dim must be an integer >= 1, got {truncate_dim!r}")
    if truncate_dim > width:
        raise CompactError(f"truncate_dim {truncate_dim} is larger than the model's embedding dimension {width}")
    return int(truncate_dim)


def check_packable(dim: int, precision: str) -> None:
    if precision in PACKED and dim % 8:
        raise CompactError(f"{precision} packs 8 dimensions per byte, and {dim} is not a multiple of 8 (binary "
                           "indexes such as FAISS's need whole bytes); choose a truncate_dim that is")


def bytes_per_vector(dim: int, precision: str) -> int:
    """Storage of one vector's values (no index overhead, no id)."""
    check_precision_name(precision)
    if precision in PACKED:
        return -(-dim // 8)
    return dim * {"float32": 4, "float16": 2}.get(precision, 1)


def check_precision_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise CompactError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


# ----------------------------------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------------------------------


def truncate(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    """The first `dim` dimensions (sentence-transformers' `truncate_embeddings`), renormalised to unit length in
    float32; a zero row (an empty text) stays zero. `dim=None` returns float32 rows unchanged (rows already cut to
    `dim`, as `SentenceTransformer(..., truncate_dim=dim).encode` returns them, are renormalised)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if dim is None:
        return embeddings
    from sentence_transformers.util import truncate_embeddings

    cut = np.ascontiguousarray(truncate_embeddings(embeddings, dim), dtype=np.float32)
    norms = np.linalg.norm(cut, axis=-1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)  # torch.nn.functional.normalize's eps


# ----------------------------------------------------------------------------------------------------------
# Calibration ranges
# ----------------------------------------------------------------------------------------------------------


def same_model(a: dict, b: dict) -> bool:
    """Two model identities (`checkpoint.ModelIdentity.as_dict()`) name the same weights: the same folder contents
    (sha256), or the same Hub id and revision."""
    if a.get("model_sha256") or b.get("model_sha256"):
        return a.get("model_sha256") == b.get("model_sha256")
    return a.get("model") == b.get("model") and a.get("revision") == b.get("revision")


CALIBRATION_SLACK = 1e-3  # rounding beyond a unit vector's [-1, 1] that ranges may carry


@dataclass(frozen=True, eq=False)  # compare with digest(): arrays have no single truth value
class CalibrationRanges:
    """Per-dimension minimum and maximum of a corpus sample's (truncated) embeddings, for int8/uint8, with the
    model and dimension they belong to."""

    minimum: np.ndarray  # float32 [dim]
    maximum: np.ndarray  # float32 [dim]
    model: dict  # checkpoint.ModelIdentity.as_dict(): model, revision, model_sha256
    rows: int  # the size of the sample
    source: str = field(default="", compare=False)  # where they were read from, for messages

    @property
    def dim(self) -> int:
        return int(self.minimum.shape[0])

    @property
    def array(self) -> np.ndarray:
        """[2, dim] float32: the `ranges` argument of sentence-transformers' `quantize_embeddings`."""
        return np.stack([self.minimum, self.maximum]).astype(np.float32)

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, **{k: self.model.get(k) for k in ("model", "revision", "model_sha256")},
                "dim": self.dim, "rows": self.rows,
                "min": [float(v) for v in self.minimum], "max": [float(v) for v in self.maximum]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, values: dict, source: str = "") -> CalibrationRanges:
        where = source or "calibration ranges"
        if not isinstance(values, dict) or values.get("format") != CALIBRATION_FORMAT:
            raise CompactError(f"{where}: not diffembed calibration ranges (format {CALIBRATION_FORMAT})")
        try:
            minimum = np.asarray(values["min"], dtype=np.float32)
            maximum = np.asarray(values["max"], dtype=np.float32)
            dim, rows = int(values["dim"]), int(values["rows"])
        except (KeyError, TypeError, ValueError) as err:
            raise CompactError(f"{where}: unreadable calibration ranges ({err})") from None
        if minimum.shape != (dim,) or maximum.shape != (dim,) or not (np.isfinite(minimum).all()
                                                                      and np.isfinite(maximum).all()):
            raise CompactError(f"{where}: calibration ranges must hold {dim} finite minima and maxima")
        if (maximum < minimum).any():
            raise CompactError(f"{where}: a calibration maximum is below its minimum")
        # the vectors are unit vectors (truncated ones renormalised): a range reaching far beyond [-1, 1] maps every
        # value to one code, which would store constant vectors without an error
        reach = float(max(np.abs(minimum).max(initial=0.0), np.abs(maximum).max(initial=0.0)))
        if reach > 1 + CALIBRATION_SLACK:
            raise CompactError(f"{where}: calibration ranges reach {reach:.3g}; the components of unit vectors lie "
                               "within [-1, 1], so these ranges are not a sample of this model's embeddings")
        model = {k: values.get(k) for k in ("model", "revision", "model_sha256")}
        return cls(minimum, maximum, model, rows, source)

    def check(self, model: dict, dim: int) -> None:
        """Refuse ranges computed with another model or at another dimension."""
        where = f" ({self.source})" if self.source else ""
        if not same_model(self.model, model):
            raise CalibrationMismatch(
                f"the calibration ranges{where} belong to another model ({_name(self.model)}), not {_name(model)}; "
                "compute them with this model (encode its corpus with --precision int8 or uint8)")
        if self.dim != dim:
            raise CalibrationMismatch(f"the calibration ranges{where} are for {self.dim} dimensions, and these "
                                      f"embeddings have {dim} (another --truncate-dim?)")


def _name(model: dict) -> str:
    name = str(model.get("model"))
    if model.get("model_sha256"):
        return f"{name}, files sha256 {model['model_sha256'][:12]}"
    return f"{name} at revision {model.get('revision')}"


def calibration_sample(rows: int, size: int = DEFAULT_CALIBRATION_ROWS) -> list[int]:
    """Indices of an evenly spread, deterministic sample of `size` rows out of `rows` (all of them if fewer)."""
    if rows <= size:
        return list(range(rows))
    return [i * rows // size for i in range(size)]


def calibrate(embeddings: np.ndarray, model: dict) -> CalibrationRanges:
    """Ranges from a sample's embeddings (already truncated): the per-dimension min and max, as
    sentence-transformers computes them from `calibration_embeddings`."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        got = embeddings.shape[0] if embeddings.ndim else 0
        raise CompactError(f"calibration needs at least 2 embeddings, got {got}")
    if not np.isfinite(embeddings).all():
        raise CompactError("calibration embeddings hold NaN or infinite values")
    if embeddings.shape[0] < 100:
        logger.warning("int8/uint8 ranges computed from only %d embeddings; a larger sample gives stabler codes",
                       embeddings.shape[0])
    return CalibrationRanges(embeddings.min(axis=0), embeddings.max(axis=0), dict(model), int(embeddings.shape[0]))


def load_calibration(path: str | Path) -> CalibrationRanges:
    """Ranges from a corpus folder or its manifest (written by `diffembed encode --precision int8`), or a JSON
    file of ranges (`CalibrationRanges.to_dict`)."""
    path = Path(path)
    if path.is_dir():  # a corpus folder: its manifest
        path = path / CorpusManifest.FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompactError(f"--calibration {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise CompactError(f"--calibration {path}: not a JSON file ({err})") from None
    if isinstance(values, dict) and values.get("format") == CorpusManifest.FORMAT:
        try:
            values = CorpusManifest.from_dict(values, source=path).calibration
        except ModelFilesError as err:
            raise CompactError(f"--calibration {err}") from None
        if values is None:
            raise CompactError(f"--calibration {path}: this corpus was not quantized to int8/uint8 (no ranges)")
    return CalibrationRanges.from_dict(values, source=str(path))


def save_calibration(ranges: CalibrationRanges, path: str | Path) -> None:
    from .outputs import write_text

    write_text(Path(path), json.dumps(ranges.to_dict(), indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------


def quantize(embeddings: np.ndarray, precision: str, ranges: CalibrationRanges | None = None) -> np.ndarray:
    """`embeddings` (float, [n, dim]) at `precision`: float32/float16 by a cast, the others by
    sentence-transformers' `quantize_embeddings` (int8/uint8 with `ranges`, which are required)."""
    check_precision(precision)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if precision == "float32":
        return embeddings
    if precision == "float16":
        return embeddings.astype(np.float16)
    dim = embeddings.shape[-1]
    if precision in SCALAR:
        if ranges is None:
            raise CompactError(f"{precision} needs calibration ranges (computed from a sample of the corpus): "
                               "pass --calibration, or encode the corpus in corpus mode, which computes them")
        if ranges.dim != dim:
            raise CalibrationMismatch(f"the calibration ranges are for {ranges.dim} dimensions, and these embeddings "
                                      f"have {dim}")
    check_packable(dim, precision)
    if embeddings.shape[0] == 0:  # sentence-transformers' older versions cannot reshape an empty batch
        width = dim // 8 if precision in PACKED else dim
        return np.zeros((0, width), dtype=np.int8 if precision in ("int8", "binary") else np.uint8)
    from sentence_transformers import quantize_embeddings

    return quantize_embeddings(embeddings, precision=precision,
                               ranges=ranges.array if precision in SCALAR else None)


def dequantize(codes: np.ndarray, precision: str, ranges: CalibrationRanges | None = None) -> np.ndarray:
    """float32 vectors whose cosine is the compact similarity: float16 as it is; int8/uint8 codes as their
    buckets' centres; binary/ubinary as +1/-1 per bit (cosine = 1 - 2 x Hamming distance / dim, so ranking by it
    is ranking by Hamming distance, ties included)."""
    check_precision_name(precision)
    if precision in ("float32", "float16"):
        return np.asarray(codes, dtype=np.float32)
    if precision in PACKED:
        return unpack_bits(codes, precision).astype(np.float32) * 2 - 1
    if ranges is None:
        raise CompactError(f"{precision} codes need their calibration ranges to be compared")
    values = codes.astype(np.float32) + (128 if precision == "int8" else 0)
    low, high = ranges.array
    steps = (high - low) / 255
    steps = np.where(steps == 0, 1, steps)  # a constant dimension: sentence-transformers' step of 1
    return low + (values + 0.5) * steps


def unpack_bits(codes: np.ndarray, precision: str) -> np.ndarray:
    """{0, 1} uint8 bits [n, dim] of binary (int8, offset by -128) or ubinary (uint8) packed codes."""
    raw = (codes.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else codes.astype(np.uint8)
    return np.unpackbits(raw, axis=-1)


def as_ubinary(codes: np.ndarray, precision: str) -> np.ndarray:
    return (codes.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else codes.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# One setting, applied where vectors leave the project
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compaction:
    """A truncation and a precision (with its calibration ranges): what `encode`, corpus shards and `evaluate`
    apply to the model's float vectors."""

    truncate_dim: int | None = None
    precision: str = "float32"
    calibration: CalibrationRanges | None = None
    rescore: int | None = None  # evaluation only: binary candidates rescored with the float query

    def __post_init__(self):
        check_precision(self.precision)
        if self.rescore is not None:
            if not is_positive_int(self.rescore):
                raise CompactError(f"rescore must be an integer >= 1 (candidates per query), got {self.rescore!r}")
            if self.precision not in PACKED:
                raise CompactError(f"rescoring applies to binary and ubinary vectors, not {self.precision}")

    @property
    def is_identity(self) -> bool:
        return self.truncate_dim is None and self.precision == "float32"

    def output_dim(self, width: int) -> int:
        return self.truncate_dim or width

    def check(self, width: int, model: dict | None = None) -> None:
        """Before any work: the dimension fits the model, packs into bytes, and the ranges are this model's."""
        check_truncate_dim(self.truncate_dim, width)
        dim = self.output_dim(width)
        check_packable(dim, self.precision)
        if self.calibration is not None:
            if self.precision not in SCALAR:
                raise CompactError(f"calibration ranges apply to int8 and uint8, not {self.precision}")
            self.calibration.check(model or {}, dim)

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        return quantize(truncate(embeddings, self.truncate_dim), self.precision, self.calibration)

    def bytes_per_vector(self, width: int) -> int:
        return bytes_per_vector(self.output_dim(width), self.precision)

    def describe(self) -> dict:
        """The settings a result depends on (for run records, caches and resume checks)."""
        return {"truncate_dim": self.truncate_dim, "precision": self.precision, "rescore": self.rescore,
                "calibration": self.calibration.digest() if self.calibration is not None else None}

    def label(self, width: int) -> str:
        text = f"{self.output_dim(width)} dims, {self.precision}"
        return text + (f" + float rescoring of the top {self.rescore}" if self.rescore else "")


# ----------------------------------------------------------------------------------------------------------
# Retrieval over compact vectors
# ----------------------------------------------------------------------------------------------------------


def hamming_distances(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """[n_queries, n_documents] Hamming distances between packed ubinary codes (uint8 [n, dim / 8])."""
    queries, documents = np.asarray(queries, dtype=np.uint8), np.asarray(documents, dtype=np.uint8)
    out = np.empty((len(queries), len(documents)), dtype=np.int32)
    block = max(1, 2**24 // max(1, documents.size))  # bound the [block, n_documents, bytes] temporary
    for start in range(0, len(queries), block):
        xor = np.bitwise_xor(queries[start:start + block, None, :], documents[None, :, :])
        out[start:start + block] = _POPCOUNT[xor].sum(axis=-1)
    return out


def compact_scores(query_embeddings: np.ndarray, documents: np.ndarray, compaction: Compaction) -> np.ndarray:
    """[n_queries, n_documents] scores of float (truncated) queries against documents stored at the compaction's
    precision: cosine for floats and dequantized int8/uint8 (queries quantized with the same ranges); for binary,
    1 - 2 x Hamming / dim, with the top `compaction.rescore` documents of each query rescored by the float query
    against their unpacked bits and ranked above the others (the rest keep their Hamming order)."""
    precision, ranges = compaction.precision, compaction.calibration
    queries = np.asarray(query_embeddings, dtype=np.float32)
    if precision in PACKED:
        dim = queries.shape[1]
        query_bits = as_ubinary(quantize(queries, precision), precision)
        distances = hamming_distances(query_bits, as_ubinary(documents, precision))
        scores = 1.0 - 2.0 * distances.astype(np.float64) / dim
        if compaction.rescore:
            scores = _rescore(queries, documents, scores, compaction.rescore, precision)
        return scores
    query_vectors = dequantize(quantize(queries, precision, ranges), precision, ranges)
    document_vectors = dequantize(documents, precision, ranges)
    return _unit(query_vectors).astype(np.float64) @ _unit(document_vectors).astype(np.float64).T


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _rescore(queries: np.ndarray, documents: np.ndarray, hamming_scores: np.ndarray, k: int,
             precision: str) -> np.ndarray:
    """Each query's `k` best documents by Hamming distance (ties by document order) get the float query's dot
    product with their {0, 1} bits; the others are placed below them, in their Hamming order."""
    k = min(k, hamming_scores.shape[1])
    order = np.argsort(-hamming_scores, axis=1, kind="stable")[:, :k]
    bits = unpack_bits(documents, precision).astype(np.float64)
    rescored = np.einsum("qd,qkd->qk", queries.astype(np.float64), bits[order])
    floor = rescored.min(axis=1, keepdims=True) - 1.0
    scores = floor - (1.0 - hamming_scores) / 2.0  # in [floor - 1, floor], below every rescored value
    np.put_along_axis(scores, order, rescored, axis=1)
    return scores


def top_k(scores: np.ndarray, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Each row's `k` highest scores and their column indices, best first (ties by column order)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1).tolist(), order.tolist()


def parse_dims(text: str | Sequence[int]) -> list[int]:
    """'1024,512,256' (or a list) as a list of distinct integers >= 1, largest first."""
    values = text.split(",") if isinstance(text, str) else list(text)
    try:
        dims = [int(str(v).strip()) for v in values if str(v).strip()]
    except ValueError:
        raise CompactError(f"dimensions must be comma-separated integers, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise CompactError(f"dimensions must be integers >= 1, got {text!r}")
    if len(set(dims)) != len(dims):
        raise CompactError(f"dimensions must be distinct, got {text!r}")
    return sorted(dims, reverse=True)
