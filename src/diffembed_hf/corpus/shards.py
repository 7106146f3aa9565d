"""The output folder: parquet shards `part-NNNNN.parquet` (`id`: string, `embedding`: fixed-size list) and the
manifest `.diffembed-manifest.json`.

The `embedding` column's type follows the precision (`compact`): float32 or float16 values; int8 or uint8 codes
(one per dimension, sentence-transformers' `quantize_embeddings` with the manifest's `calibration` ranges); binary
(int8) or ubinary (uint8) bytes of `np.packbits` bits, dim / 8 per row, first dimension in the highest bit.

The manifest's name starts with a dot so that the readers users point at the folder (`pyarrow.parquet.
read_table(DIR)`, `pandas.read_parquet(DIR)`, `datasets.load_dataset("parquet", data_dir=DIR)`) skip it, as
they skip hidden files. The manifest's fields and their order are `records.CorpusManifest`'s.

A shard is written to a hidden temporary file and renamed into place, so a file under a final name is always
complete, with parquet page checksums. Each shard carries in its parquet metadata the digest of the run's
settings and of its input rows. A rerun keeps a shard only if its footer carries this run's digests, its row
count is right, its bytes match the sha256 an earlier manifest recorded for it (when one did), and every page
passes its checksum; anything else is recomputed. The manifest is written when the run starts (`"complete":
false`, the settings, and the shard digests an earlier manifest of the same settings recorded) and rewritten by
the last step of the run with every shard's row count and sha256 (`"complete": true`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model_folder import file_sha256
from ..errors import CorpusError
from ..outputs import staged_file, write_json
from ..records import CorpusManifest

logger = logging.getLogger(__name__)

MANIFEST = CorpusManifest.FILE
FORMAT = CorpusManifest.FORMAT
_META_KEY = b"diffembed"
DTYPES = ("float32", "float16")  # --dtype; --precision (compact.PRECISIONS) also takes the compact types

# Human names of the settings a rerun must share with the folder's run, in the order they are checked.
SETTING_NAMES = {
    "model": "model", "revision": "model revision", "model_sha256": "model files (weights, config, tokenizer)",
    "prompt": "prompt", "max_seq_length": "max sequence length", "normalized": "normalisation",
    "include_prompt": "prompt pooling", "weights_dtype": "compute dtype", "quantize": "quantization",
    "dtype": "precision", "truncate_dim": "truncate dim", "calibration": "calibration ranges",
    "calibration_rows": "calibration sample rows (--calibration-rows)",
    "dim": "embedding dimension", "shard_size": "shard size", "input": "input", "field": "text field",
    "id_field": "id field", "title_field": "title field", "split": "split", "subset": "subset",
    "skip_bad_rows": "--skip-bad-rows", "rows": "number of input rows", "input_digest": "input contents",
}


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


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
    with staged_file(folder / shard_name(index)) as temporary:
        pq.write_table(table, temporary, write_page_checksum=True)
        digest = file_sha256(temporary)
    return ShardInfo(index, len(ids), digest, computed=True)


def verify_shard(folder: Path, index: int, stamp: dict, rows: int, known_sha256: str | None = None) -> ShardInfo | None:
    """The kept shard's info if `part-index` exists, carries `stamp`, holds `rows` rows, matches the sha256 an
    earlier manifest recorded for it (if any) and every page passes its checksum; None (recompute) otherwise."""
    import pyarrow.parquet as pq

    path = folder / shard_name(index)
    if not path.is_file():
        return None
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        found = json.loads(parquet.schema_arrow.metadata[_META_KEY])
        complete = parquet.metadata.num_rows == rows
    except Exception as err:  # noqa: BLE001 - unreadable: recompute it
        logger.warning("%s is unreadable (%s); recomputing it", path, err)
        return None
    if found != stamp or not complete:
        logger.warning("%s was made from other input rows or settings; recomputing it", path)
        return None
    digest = file_sha256(path)
    if known_sha256 is not None and digest != known_sha256:
        logger.warning("%s differs from the sha256 its manifest recorded (damaged since?); recomputing it", path)
        return None
    try:
        parquet.read()  # every page against its checksum (and every compressed page decompressed)
    except Exception as err:  # noqa: BLE001 - damaged data pages: recompute it
        logger.warning("%s has damaged data (%s); recomputing it", path, err)
        return None
    return ShardInfo(index, rows, digest, computed=False)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path} is not valid JSON ({err}); pass --overwrite to replace the folder's "
                          "embeddings") from err
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(folder: Path, manifest: CorpusManifest) -> None:
    write_json(folder / MANIFEST, manifest.to_dict())


def _temporary(path: Path) -> bool:
    """A file a killed run of ours left: a shard or a manifest being written."""
    return path.name.startswith((".part-", f".{MANIFEST}."))


def _ours(path: Path) -> bool:
    name = path.name
    return name == MANIFEST or (name.startswith("part-") and name.endswith(".parquet")) or _temporary(path)


def _refuse_other_settings(folder: Path, previous: dict, settings: dict) -> None:
    key = next(k for k in [*SETTING_NAMES, *sorted(set(previous) | set(settings))]
               if previous.get(k) != settings.get(k))
    raise CorpusError(
        f"{folder}/ holds embeddings made with {SETTING_NAMES.get(key, key)} {_show(previous.get(key))}, "
        f"this run asks for {_show(settings.get(key))}; rerun with the same settings to resume, or pass "
        "--overwrite to replace them")


def check_settings_early(folder: Path, settings: dict, *, overwrite: bool, pending: tuple[str, ...]) -> None:
    """Refuse, before costly work, a run whose settings differ from those of the embeddings in `folder` in
    anything but the `pending` settings (not known yet: what that work computes, such as calibration ranges),
    as `prepare_folder` would refuse it afterwards. A missing or unreadable manifest is left to `prepare_folder`."""
    if overwrite or not folder.is_dir():
        return
    try:
        manifest = read_manifest(folder)
    except CorpusError:
        return
    previous = (manifest or {}).get("settings")
    if isinstance(previous, dict):
        previous = {k: v for k, v in previous.items() if k not in pending}
        if previous != settings:
            _refuse_other_settings(folder, previous, settings)


def prepare_folder(folder: Path, settings: dict, *, overwrite: bool, extra: dict | None = None) -> dict[int, str]:
    """Check the folder against this run's settings and write the opening manifest (with `extra` fields); return
    the shard digests an earlier manifest with the same settings recorded (shard index -> sha256), for
    `verify_shard`.

    Same settings: resume. Other settings: refused, naming the first difference, unless `overwrite`, which
    removes the earlier run's shards and manifest first. A corrupt manifest is replaced with `overwrite`. A
    non-empty folder that is not an output folder is never touched."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = read_manifest(folder)
    except CorpusError:
        if not overwrite:
            raise
        logger.warning("--overwrite: replacing the unreadable manifest of %s and its shards", folder)
        manifest = {"format": FORMAT, "settings": None}
    entries = [p for p in folder.iterdir()]
    if manifest is None and any(not _ours(p) for p in entries):
        raise CorpusError(f"{folder}/ is not empty and holds no {MANIFEST}: choose a new or empty output folder")
    if manifest is not None and manifest.get("format") != FORMAT:
        raise CorpusError(f"{folder / MANIFEST} is not a diffembed corpus manifest; choose another output folder")
    previous = manifest.get("settings", {}) if manifest else None
    if previous is not None and previous != settings:
        if not overwrite:
            _refuse_other_settings(folder, previous, settings)
        logger.warning("--overwrite: removing the earlier run's shards from %s", folder)
    known = {}
    if manifest is None or previous != settings:
        for path in entries:
            if _ours(path):
                path.unlink()
    else:  # the same run resumed: what an earlier manifest recorded of each shard is kept and checked
        for shard in manifest.get("shards") or []:
            name = shard.get("file", "") if isinstance(shard, dict) else ""
            if re.fullmatch(r"part-\d{5,}\.parquet", name) and isinstance(shard.get("sha256"), str):
                known[int(name[5:-8])] = shard["sha256"]
    for path in entries:  # temporary files of a killed run
        if path.exists() and _temporary(path):
            path.unlink()
    shards = [{"file": shard_name(k), "sha256": v} for k, v in sorted(known.items())]
    write_manifest(folder, CorpusManifest(settings, complete=False, shards=shards or None, vectors=dict(extra or {})))
    return known


def _show(value) -> str:
    return json.dumps(value, ensure_ascii=False) if len(json.dumps(value, ensure_ascii=False)) <= 200 else \
        json.dumps(value, ensure_ascii=False)[:200] + "..."


def finish_manifest(folder: Path, settings: dict, shards: list[ShardInfo], *, skipped: int, skipped_examples: list[str],
                    extra: dict) -> dict:
    shards = sorted(shards, key=lambda s: s.index)
    manifest = CorpusManifest(
        settings, complete=True, summary={k: settings[k] for k in CorpusManifest.SUMMARY},
        rows=sum(s.rows for s in shards), skipped_rows=skipped, skipped_examples=skipped_examples,
        shards=[{"file": shard_name(s.index), "rows": s.rows, "sha256": s.sha256} for s in shards], vectors=extra)
    write_manifest(folder, manifest)
    return manifest.to_dict()
