"""The output folder: parquet shards `part-NNNNN.parquet` (`id`: string, `embedding`: fixed-size list) and
`manifest.json`.

The `embedding` column's type follows the precision (`compact`): float32 or float16 values; int8 or uint8 codes
(one per dimension, sentence-transformers' `quantize_embeddings` with the manifest's `calibration` ranges); binary
(int8) or ubinary (uint8) bytes of `np.packbits` bits, dim / 8 per row, first dimension in the highest bit.

A shard is written to a hidden temporary file and renamed into place, so a file under a final name is always
complete. Each shard carries in its parquet metadata the digest of the run's settings and of its input rows:
a rerun keeps a shard only if both match (verified from the file's footer) and recomputes the rest.
`manifest.json` is written when the run starts (`"complete": false`, the settings) and rewritten by the last
step of the run with every shard's row count and sha256 (`"complete": true`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .read import CorpusError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "diffembed-corpus-embeddings/1"
_META_KEY = b"diffembed"
DTYPES = ("float32", "float16")  # --dtype; --precision (compact.PRECISIONS) also takes the compact types

# Human names of the settings a rerun must share with the folder's run, in the order they are checked.
SETTING_NAMES = {
    "model": "model", "revision": "model revision", "model_sha256": "model files (weights, config, tokenizer)",
    "prompt": "prompt", "max_seq_length": "max sequence length", "normalized": "normalisation",
    "include_prompt": "prompt pooling", "weights_dtype": "compute dtype", "dtype": "precision",
    "truncate_dim": "truncate dim", "calibration": "calibration ranges", "dim": "embedding dimension", "shard_size": "shard size", "input": "input", "field": "text field",
    "id_field": "id field", "title_field": "title field", "split": "split", "subset": "subset",
    "skip_bad_rows": "--skip-bad-rows", "rows": "number of input rows", "input_digest": "input contents",
}


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# numpy type of the stored values per precision (binary: packed bits less 128, as sentence-transformers stores them)
VALUE_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
               "binary": np.int8, "ubinary": np.uint8}


def schema(width: int, dtype: str):
    """`width` values per row: the dimension, or dim / 8 bytes for binary and ubinary."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.from_numpy_dtype(VALUE_TYPES[dtype]), width))])


@dataclass
class ShardInfo:
    index: int
    rows: int
    sha256: str
    computed: bool  # False when an earlier run's file was verified and kept
    truncated: int = 0  # texts cut to max_seq_length (computed shards only)


def write_shard(folder: Path, index: int, ids: list[str], embeddings: np.ndarray, dtype: str, stamp: dict) -> ShardInfo:
    """Write shard `index` atomically; `stamp` (settings and input digests) goes into the parquet metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = embeddings.shape[1]
    values = pa.array(np.ascontiguousarray(embeddings, dtype=VALUE_TYPES[dtype]).ravel())
    table = pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(values, width)],
        schema=schema(width, dtype).with_metadata({_META_KEY: json.dumps(stamp).encode()}),
    )
    final = folder / shard_name(index)
    temporary = folder / f".{final.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = file_sha256(temporary)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return ShardInfo(index, len(ids), digest, computed=True)


def verify_shard(folder: Path, index: int, stamp: dict, rows: int) -> ShardInfo | None:
    """The kept shard's info if `part-index` exists, carries `stamp` and holds `rows` rows; None otherwise."""
    import pyarrow.parquet as pq

    path = folder / shard_name(index)
    if not path.is_file():
        return None
    try:
        parquet = pq.ParquetFile(path)
        found = json.loads(parquet.schema_arrow.metadata[_META_KEY])
        complete = parquet.metadata.num_rows == rows
    except Exception as err:  # noqa: BLE001 - unreadable: recompute it
        logger.warning("%s is unreadable (%s); recomputing it", path, err)
        return None
    if found != stamp or not complete:
        logger.warning("%s was made from other input rows or settings; recomputing it", path)
        return None
    return ShardInfo(index, rows, file_sha256(path), computed=False)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CorpusError(f"{path} is not valid JSON ({err}); remove it or pass --overwrite") from err


def write_manifest(folder: Path, manifest: dict) -> None:
    temporary = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST)


def _ours(path: Path) -> bool:
    name = path.name
    return name == MANIFEST or (name.startswith("part-") and name.endswith(".parquet")) or (
        name.startswith((".part-", f".{MANIFEST}")) and name.endswith(".tmp"))


def prepare_folder(folder: Path, settings: dict, *, overwrite: bool, extra: dict | None = None) -> None:
    """Check the folder against this run's settings and write the opening manifest.

    Same settings: resume. Other settings: refused, naming the first difference, unless `overwrite`, which
    removes the earlier run's shards and manifest first. A non-empty folder that is not an output folder is
    never touched."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    entries = [p for p in folder.iterdir()]
    if manifest is None and any(not _ours(p) for p in entries):
        raise CorpusError(f"{folder}/ is not empty and holds no {MANIFEST}: choose a new or empty output folder")
    if manifest is not None and manifest.get("format") != FORMAT:
        raise CorpusError(f"{folder / MANIFEST} is not a diffembed corpus manifest; choose another output folder")
    previous = manifest.get("settings", {}) if manifest else None
    if previous is not None and previous != settings:
        if not overwrite:
            key = next(k for k in [*SETTING_NAMES, *sorted(set(previous) | set(settings))]
                       if previous.get(k) != settings.get(k))
            raise CorpusError(
                f"{folder}/ holds embeddings made with {SETTING_NAMES.get(key, key)} {_show(previous.get(key))}, "
                f"this run asks for {_show(settings.get(key))}; rerun with the same settings to resume, or pass "
                "--overwrite to replace them")
        logger.warning("--overwrite: removing the earlier run's shards from %s", folder)
    if manifest is None or previous != settings:
        for path in entries:
            if _ours(path):
                path.unlink()
    for path in entries:  # temporary files of a killed run
        if path.exists() and path.name.endswith(".tmp") and _ours(path):
            path.unlink()
    write_manifest(folder, {"format": FORMAT, "complete": False, **(extra or {}), "settings": settings})


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False) if len(json.dumps(value, ensure_ascii=False)) <= 200 else \
        json.dumps(value, ensure_ascii=False)[:200] + "..."


def finish_manifest(folder: Path, settings: dict, shards: list[ShardInfo], *, skipped: int, skipped_examples: list[str],
                    extra: dict) -> dict:
    shards = sorted(shards, key=lambda s: s.index)
    manifest = {
        "format": FORMAT,
        "complete": True,
        **{k: settings[k] for k in ("model", "revision", "dim", "prompt", "normalized", "max_seq_length", "dtype")},
        "rows": sum(s.rows for s in shards),
        "skipped_rows": skipped,
        "skipped_examples": skipped_examples,
        "shards": [{"file": shard_name(s.index), "rows": s.rows, "sha256": s.sha256} for s in shards],
        **extra,
        "settings": settings,
    }
    write_manifest(folder, manifest)
    return manifest
