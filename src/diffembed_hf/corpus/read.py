"""Streaming corpus input: `.jsonl`, `.parquet`, `.csv`, a folder of them, or a Hub dataset (`datasets`).

Rows come out one at a time in a fixed order (files sorted by path), so a corpus of any size is read in
memory bounded by what the caller keeps. Every row carries where it came from (file and row) for error
messages, and a `Position` from which a later reader can resume without re-reading what lies before it: a
byte offset in a JSON-lines file, a row index in a parquet file (whole row groups are skipped) or a CSV file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import is_hub_id
from ..errors import CorpusError, require_extra

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".parquet", ".csv")
ID_FIELDS = ("_id", "id")  # the default id columns, in order (BEIR / mteb corpora use `_id`)
ROW_NUMBER = "row number"  # id_field value meaning: ids are the rows' positions


@dataclass(frozen=True)
class CorpusSource:
    """Where the corpus is and which fields hold the id, the text and optionally a title."""

    path: str
    field: str = "text"
    id_field: str | None = None  # None: `_id`, else `id`, else the row number (decided on the first row)
    title_field: str | None = None
    split: str | None = None  # Hub datasets only
    subset: str | None = None  # Hub datasets only
    dataset: Any = None  # a `datasets.Dataset` / `IterableDataset` given to the library instead of a path

    def describe(self) -> dict:
        source = self.path if self.dataset is None else repr(self.dataset)[:300]
        return {"input": source, "field": self.field, "id_field": self.id_field, "title_field": self.title_field,
                "split": self.split, "subset": self.subset}


@dataclass(frozen=True)
class Position:
    """Where a row starts: file number in the sorted file list, and offset (bytes for .jsonl, rows otherwise)."""

    file: int = 0
    offset: int = 0


@dataclass
class Row:
    index: int  # position in the whole corpus, 0-based
    id: str | None
    text: str | None
    where: str  # "corpus.jsonl line 17": for messages
    position: Position
    id_field: str = ROW_NUMBER  # the id column this run uses (decided on the corpus's first row)
    problem: str | None = None  # why the row cannot be embedded; None for a good row


def join_title(title: Any, text: str) -> str:
    """Title and text joined as mteb joins them for retrieval corpora: `(title + " " + text).strip()` when the
    title is non-empty, else `text.strip()` (mteb 2.x `_create_dataloaders._corpus_to_dict`)."""
    return f"{title} {text}".strip() if title else text.strip()


def is_hub_dataset(path: str) -> bool:
    """`hf://datasets/ORG/NAME`, or `ORG/NAME` where no such local path exists (a missing local file is named
    as missing, not as an unreachable Hub dataset)."""
    return path.startswith("hf://datasets/") or is_hub_id(path)


def list_files(path: str) -> list[Path]:
    """The corpus files: the file itself, or every .jsonl/.parquet/.csv under a folder, sorted, hidden ones left out."""
    root = Path(path)
    if root.is_file():
        if root.suffix not in SUFFIXES:
            raise CorpusError(f"{root}: unsupported input type {root.suffix or '(none)'}; use .jsonl, .parquet or .csv")
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise CorpusError(f"{root}/ holds no .jsonl, .parquet or .csv file")
        return files
    raise CorpusError(f"{path}: no such file or folder (a Hub dataset is named ORG/NAME or hf://datasets/ORG/NAME)")


def _records_jsonl(path: Path, offset: int) -> Iterator[tuple[Any, str, int]]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        line_number = None if offset else 0  # line numbers are known only when reading from the start
        while True:
            start = handle.tell()
            line = handle.readline()
            if not line:
                return
            line_number = None if line_number is None else line_number + 1
            if not line.strip():
                continue
            where = f"{path} line {line_number}" if line_number else f"{path} byte {start}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield err, where, start
                continue
            yield record, where, start


def _records_parquet(path: Path, offset: int, columns: list[str]) -> Iterator[tuple[Any, str, int]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = [c for c in dict.fromkeys(columns) if c in parquet.schema_arrow.names]
    first_group, row = 0, 0  # whole row groups before the start are skipped without being read
    while first_group < parquet.num_row_groups and row + parquet.metadata.row_group(first_group).num_rows <= offset:
        row += parquet.metadata.row_group(first_group).num_rows
        first_group += 1
    groups = list(range(first_group, parquet.num_row_groups))
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=wanted) if groups else ():
        for record in batch.to_pylist():
            if row >= offset:
                yield record, f"{path} row {row + 1}", row
            row += 1


def _records_csv(path: Path, offset: int) -> Iterator[tuple[Any, str, int]]:
    with open(path, encoding="utf-8", newline="") as handle:
        for number, record in enumerate(csv.DictReader(handle)):
            if number >= offset:
                yield record, f"{path} row {number + 1}", number


def _columns(path: Path) -> list[str] | None:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow.names
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), [])
    return None  # JSON lines: per record


def _records_hub(source: CorpusSource, offset: int) -> Iterator[tuple[Any, str, int]]:
    require_extra("train", ("datasets",), what="reading a Hub dataset")
    import datasets

    name = source.path.removeprefix("hf://datasets/")
    try:
        data = datasets.load_dataset(name, source.subset, split=source.split, streaming=True)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, unknown split: say which and why
        raise CorpusError(f"{source.path} is neither a local file or folder nor a loadable Hub dataset "
                          f"({type(err).__name__}: {err})") from err
    if isinstance(data, datasets.IterableDatasetDict):
        if len(data) != 1:
            raise CorpusError(f"{name} has splits {sorted(data)}: choose one with --split")
        data = next(iter(data.values()))
    yield from _records_dataset(data, name, offset)


def _records_dataset(data, name: str, offset: int) -> Iterator[tuple[Any, str, int]]:
    for number, record in enumerate(data.skip(offset) if offset else data, offset):
        yield record, f"{name} row {number}", number


def iter_rows(source: CorpusSource, start: Position = Position(), start_index: int = 0) -> Iterator[Row]:
    """Every row of the corpus from `start` (whose corpus index is `start_index`), checked: a row that cannot be
    embedded comes out with `problem` set (the caller decides whether to stop or skip)."""
    if source.dataset is not None:
        streams = [lambda offset: _records_dataset(source.dataset, "dataset", offset)]
    elif is_hub_dataset(source.path):
        streams = [lambda offset, s=source: _records_hub(s, offset)]
    else:
        streams = []
        for path in list_files(source.path):
            columns = _columns(path)
            if columns is not None and source.field not in columns:
                raise CorpusError(f"{path} has no column {source.field!r} (columns: {', '.join(columns)}); "
                                  "name the text column with --field")
            if path.suffix == ".jsonl":
                streams.append(lambda offset, p=path: _records_jsonl(p, offset))
            elif path.suffix == ".csv":
                streams.append(lambda offset, p=path: _records_csv(p, offset))
            else:
                wanted = [source.field, *ID_FIELDS, source.id_field or "", source.title_field or ""]
                streams.append(lambda offset, p=path, w=wanted: _records_parquet(p, offset, w))
    id_field = source.id_field
    index = start_index
    for file_number in range(start.file, len(streams)):
        offset = start.offset if file_number == start.file else 0
        for record, where, offset in streams[file_number](offset):
            position = Position(file_number, offset)
            if id_field is None:  # decided on the first row read: readers from a later position pass the plan's
                id_field = next((f for f in ID_FIELDS if isinstance(record, dict) and f in record), ROW_NUMBER)
            yield _check(record, index, where, position, source, id_field)
            index += 1


def _check(record, index: int, where: str, position: Position, source: CorpusSource, id_field: str) -> Row:
    row = Row(index, None, None, where, position, id_field)
    if isinstance(record, Exception):
        row.problem = f"not valid JSON ({record})"
        return row
    if not isinstance(record, dict):
        row.problem = f"a JSON line must be an object, got {type(record).__name__}"
        return row
    if id_field == ROW_NUMBER:
        row.id = str(index)
    else:
        value = record.get(id_field)
        if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)) or value == "":
            row.problem = f"id field {id_field!r} is {'missing' if value is None else repr(value)[:60]}"
            return row
        row.id = str(value)
    text = record.get(source.field)
    if not isinstance(text, str):
        fields = ", ".join(map(str, record))[:200] or "none"
        row.problem = (f"text field {source.field!r} is missing (the row's fields: {fields})" if text is None
                       else f"text field {source.field!r} is {type(text).__name__} ({text!r:.60}), expected a string")
        return row
    if source.title_field is not None:
        title = record.get(source.title_field)
        if title is not None and not isinstance(title, str):
            row.problem = f"title field {source.title_field!r} is {type(title).__name__}, expected a string"
            return row
        text = join_title(title, text)
    row.text = text
    return row


@dataclass
class ShardPlan:
    """What a scan of the corpus found: per shard its first position, input rows, good rows and a digest of them."""

    shard_size: int
    id_field: str = ROW_NUMBER
    rows: int = 0  # input rows
    good_rows: int = 0
    skipped: int = 0  # bad rows left out (--skip-bad-rows)
    skipped_examples: list[str] = field(default_factory=list)  # "where: problem" of the first 20
    starts: list[tuple[Position, int]] = field(default_factory=list)  # (position, corpus index) per shard
    shard_rows: list[int] = field(default_factory=list)  # good rows per shard
    digests: list[str] = field(default_factory=list)  # per shard: blake2b of its ids and texts

    @property
    def num_shards(self) -> int:
        return len(self.starts)

    def corpus_digest(self) -> str:
        return hashlib.blake2b("".join(self.digests).encode(), digest_size=16).hexdigest()


def scan(source: CorpusSource, shard_size: int, *, skip_bad_rows: bool = False) -> ShardPlan:
    """Read the corpus once: validate every row, refuse duplicate ids, and cut it into shards of `shard_size`
    input rows. Holds 8 bytes per row (a hash of its id) for the duplicate check, nothing else per row."""
    plan = ShardPlan(shard_size)
    hashes, chunk = [], []
    digest = None
    for row in iter_rows(source):
        if row.index % shard_size == 0:
            if digest is not None:
                plan.digests.append(digest.hexdigest())
            plan.starts.append((row.position, row.index))
            plan.shard_rows.append(0)
            digest = hashlib.blake2b(digest_size=16)
        if row.index == 0:
            plan.id_field = row.id_field
        plan.rows += 1
        if row.problem is not None:
            if not skip_bad_rows:
                raise _bad_row(source, row, any_good=plan.good_rows > 0)
            plan.skipped += 1
            if len(plan.skipped_examples) < 20:
                plan.skipped_examples.append(f"{row.where}: {row.problem}")
            digest.update(b"\x02skipped\x00")
            continue
        plan.good_rows += 1
        plan.shard_rows[-1] += 1
        digest.update(row.id.encode() + b"\x00" + row.text.encode("utf-8", "surrogatepass") + b"\x01")
        chunk.append(_id_hash(row.id))
        if len(chunk) == 65536:
            hashes.append(np.array(chunk, dtype=np.uint64))
            chunk = []
    if digest is not None:
        plan.digests.append(digest.hexdigest())
    hashes.append(np.array(chunk, dtype=np.uint64))
    _refuse_duplicates(source, np.concatenate(hashes))
    if plan.skipped:
        logger.warning("Skipped %d bad rows; first: %s", plan.skipped, plan.skipped_examples[0])
    return plan


def check_first_row(source: CorpusSource, *, skip_bad_rows: bool) -> None:
    """Before the model loads, the mistakes a first row shows: a missing input, a file type this reader does not
    read, a text column or field that is not there (a Hub dataset is read only once the job runs)."""
    if source.dataset is not None or is_hub_dataset(source.path):
        return
    first = next(iter_rows(source), None)
    if first is not None and first.problem is not None and not skip_bad_rows:
        raise _bad_row(source, first, any_good=False)


LOOK_AHEAD_ROWS = 100_000  # rows read past a bad first row to see whether --skip-bad-rows would leave any


def _bad_row(source: CorpusSource, row: Row, *, any_good: bool) -> CorpusError:
    """The error for a bad row, with advice that works when followed: --skip-bad-rows only if some row would be
    left to embed; when no row can be embedded (a mistyped --field or --id-field), the option to fix."""
    if not any_good:
        ahead = dataclasses.replace(source, id_field=row.id_field)
        read = 0
        for later in iter_rows(ahead, row.position, row.index):
            if later.problem is None:
                any_good = True
                break
            read += 1
            if read >= LOOK_AHEAD_ROWS:
                break
    if any_good:
        return CorpusError(f"{row.where}: {row.problem} (pass --skip-bad-rows to leave such rows out)")
    if row.problem.startswith("text field"):
        fix = f"is the text in another field? name it with --field (now {source.field!r})"
    elif row.problem.startswith("id field"):
        fix = f"are the ids in another field? name it with --id-field (now {row.id_field!r})"
    else:
        fix = "fix the input"
    scope = "no row of the corpus" if read < LOOK_AHEAD_ROWS else f"none of the first {read} rows"
    return CorpusError(f"{row.where}: {row.problem}, and {scope} can be embedded (--skip-bad-rows would leave "
                       f"nothing); {fix}")


def _id_hash(identifier: str) -> int:
    digest = hashlib.blake2b(identifier.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _refuse_duplicates(source, hashes: np.ndarray) -> None:
    """Equal hashes are confirmed on the ids themselves (a second read, only then), so a hash collision never
    refuses a corpus."""
    hashes.sort()
    suspects = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not suspects:
        return
    seen: dict[str, str] = {}
    for row in iter_rows(source):
        if row.problem is None and _id_hash(row.id) in suspects:
            if row.id in seen:
                raise CorpusError(f"duplicate id {row.id!r}: {seen[row.id]} and {row.where}; ids must be unique")
            seen[row.id] = row.where
