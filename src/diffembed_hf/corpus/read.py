"""Streaming corpus input: JSON lines, CSV, parquet, a folder of them, or a Hub dataset (`datasets`).

Files are opened, decoded and split by `diffembed_hf.readers`, the reader every command shares (BOM, compressed
files, suffixes in any case, UTF-8 checks, long CSV fields, lone surrogates). Rows come out one at a time in a
fixed order (a folder's files sorted by path), so a corpus of any size is read in memory bounded by what the
caller keeps. Every row carries where it came from (file and line or row) for error messages, and a `Position`
from which a later reader can resume without re-reading what lies before it: a byte offset in a JSON-lines or
CSV file (of the decompressed data for a compressed one), a row index in a parquet file (whole row groups are
skipped) or a Hub dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..model_folder import is_hub_id
from ..errors import CorpusError, require_extra
from ..readers import Record, check_id, check_text, columns_of, describe_files, list_inputs, no_field, read_records

logger = logging.getLogger(__name__)

ID_FIELDS = ("_id", "id")  # the default id columns, in order (BEIR / mteb corpora use `_id`)
ROW_NUMBER = "row number"  # id_field value meaning: ids are the rows' positions


@dataclass(frozen=True)
class CorpusSource:
    """Where the corpus is and which fields hold the id, the text and optionally a title."""

    path: str
    field: str = "text"
    id_field: str | None = None  # None: `_id`, else `id`, else the row number (decided on the first readable row)
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
    """Where a row starts: file number in the sorted file list, and offset (bytes in JSON lines and CSV, rows in
    parquet and Hub datasets)."""

    file: int = 0
    offset: int = 0


@dataclass
class Row:
    index: int  # position in the whole corpus, 0-based
    id: str | None
    text: str | None
    where: str  # "corpus.jsonl line 17": for messages
    position: Position
    id_field: str | None = ROW_NUMBER  # the id column this run uses (None until a readable row decides it)
    problem: str | None = None  # why the row cannot be embedded; None for a good row
    absent: tuple[str, str] | None = None  # (field, option) when the row lacks that field altogether
    fields: tuple[str, ...] | None = None  # the row's fields, when it lacks a field an option names
    has_title: bool = False  # the row has the --title-field field (its value may still be None)


def join_title(title: Any, text: str) -> str:
    """Title and text joined as mteb joins them for retrieval corpora: `(title + " " + text).strip()` when the
    title is non-empty, else `text.strip()` (mteb 2.x `_create_dataloaders._corpus_to_dict`)."""
    return f"{title} {text}".strip() if title else text.strip()


def is_hub_dataset(path: str) -> bool:
    """`hf://datasets/ORG/NAME`, or `ORG/NAME` where no such local path exists (a missing local file is named
    as missing, not as an unreachable Hub dataset)."""
    return path.startswith("hf://datasets/") or is_hub_id(path)


def list_files(path: str) -> list[Path]:
    """The corpus files: the file itself, or every input file under a folder (`readers.list_inputs`)."""
    return list_inputs(path, CorpusError)[0]


def warn_left_out(path: str) -> None:
    """One warning naming the files of an input folder that are not corpus files (said once per run, by the
    reader that scans the corpus)."""
    if Path(path).is_dir():
        others = list_inputs(path, CorpusError)[1]
        if others:
            logger.warning("%s/: not read, not corpus files (%d): %s. Corpus files end in .jsonl, .ndjson, "
                           ".jsonlines or .csv, optionally .gz / .bz2 / .xz, or .parquet", path.rstrip("/"),
                           len(others), describe_files(others, Path(path)))


def _file_records(path: Path, offset: int, source: CorpusSource) -> Iterator[Record]:
    columns = columns_of(path, CorpusError)
    if columns is not None:  # CSV and parquet name their columns once: a mistyped name is refused here
        for name, option in ((source.field, "--field"), (source.id_field, "--id-field"),
                             (source.title_field, "--title-field")):
            if name is not None and name != ROW_NUMBER and name not in columns:
                raise CorpusError(f"{path}: {no_field(name, columns, option)}")
    wanted = [source.field, *ID_FIELDS, source.id_field or "", source.title_field or ""]
    return read_records(path, offset, columns=wanted, error=CorpusError)


def _records_hub(source: CorpusSource, offset: int) -> Iterator[Record]:
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


def _records_dataset(data, name: str, offset: int) -> Iterator[Record]:
    for number, record in enumerate(data.skip(offset) if offset else data, offset):
        yield Record(record, f"{name} row {number}", number)


def iter_rows(source: CorpusSource, start: Position = Position(), start_index: int = 0) -> Iterator[Row]:
    """Every row of the corpus from `start` (whose corpus index is `start_index`), checked: a row that cannot be
    embedded comes out with `problem` set (the caller decides whether to stop or skip)."""
    if source.dataset is not None:
        streams = [lambda offset: _records_dataset(source.dataset, "dataset", offset)]
    elif is_hub_dataset(source.path):
        streams = [lambda offset, s=source: _records_hub(s, offset)]
    else:
        streams = [lambda offset, p=path: _file_records(p, offset, source) for path in list_files(source.path)]
    id_field = source.id_field
    index = start_index
    for file_number in range(start.file, len(streams)):
        for record in streams[file_number](start.offset if file_number == start.file else 0):
            if id_field is None and record.data is not None:  # decided on the first readable row (readers from a
                id_field = next((f for f in ID_FIELDS if f in record.data), ROW_NUMBER)  # later position pass it)
            yield _check(record, index, Position(file_number, record.offset), source, id_field)
            index += 1


def _absent(row: Row, data: dict, name: str, what: str, option: str) -> Row:
    row.problem, row.absent, row.fields = f"{what} field {name!r} is missing", (name, option), tuple(map(str, data))
    return row


def _check(record: Record, index: int, position: Position, source: CorpusSource, id_field: str) -> Row:
    row = Row(index, None, None, record.where, position, id_field, record.problem)
    data = record.data
    if data is None:
        return row
    if source.title_field is not None:
        row.has_title = source.title_field in data
        row.fields = None if row.has_title else tuple(map(str, data))
    if id_field == ROW_NUMBER:
        row.id = str(index)
    else:
        if id_field not in data:
            return _absent(row, data, id_field, "id", "--id-field")
        row.id, row.problem = check_id(data[id_field], f"id field {id_field!r}")
        if row.problem:
            return row
    if source.field not in data:
        return _absent(row, data, source.field, "text", "--field")
    text = data[source.field]
    row.problem = check_text(text, f"text field {source.field!r}")
    if row.problem is None and source.title_field is not None:
        title = data.get(source.title_field)
        row.problem = None if title is None else check_text(title, f"title field {source.title_field!r}")
        text = join_title(title, text)
    if row.problem is None:
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
    if source.dataset is None and not is_hub_dataset(source.path):
        warn_left_out(source.path)
    plan = ShardPlan(shard_size)
    hashes, chunk = [], []
    digest = None
    first_absent = None  # the first row that lacks a field the options name ("choose one with --field")
    untitled = None  # the first row without the --title-field field, while no row has had it
    title_seen = source.title_field is None
    first_readable = 0
    for row in iter_rows(source):
        if row.index % shard_size == 0:
            if digest is not None:
                plan.digests.append(digest.hexdigest())
            plan.starts.append((row.position, row.index))
            plan.shard_rows.append(0)
            digest = hashlib.blake2b(digest_size=16)
        if row.index == first_readable:  # a bad row before it (not JSON, not UTF-8) decides nothing
            if row.id_field is None:
                first_readable += 1
            else:
                plan.id_field = row.id_field
        plan.rows += 1
        if not title_seen:
            title_seen = row.has_title
            untitled = untitled or (row if row.fields is not None else None)
        if row.problem is not None:
            if row.absent and plan.good_rows == 0:
                if not skip_bad_rows:  # the field is missing from the first rows: a mistyped option, not bad rows
                    raise _mistyped(row, *row.absent)
                first_absent = first_absent or row
            if not skip_bad_rows:
                raise _bad_row(source, row, any_good=plan.good_rows > 0)
            plan.skipped += 1
            if len(plan.skipped_examples) < 20:
                plan.skipped_examples.append(f"{row.where}: {row.problem}")
            digest.update(b"\x02skipped\x00")
            continue
        plan.good_rows += 1
        plan.shard_rows[-1] += 1
        digest.update(row.id.encode() + b"\x00" + row.text.encode("utf-8") + b"\x01")
        chunk.append(_id_hash(row.id))
        if len(chunk) == 65536:
            hashes.append(np.array(chunk, dtype=np.uint64))
            chunk = []
    if digest is not None:
        plan.digests.append(digest.hexdigest())
    if plan.good_rows == 0 and first_absent is not None:  # --skip-bad-rows skipped every row
        raise _mistyped(first_absent, *first_absent.absent, " (no row has it)")
    if not title_seen and untitled is not None:  # a mistyped --title-field would leave every title out
        raise _mistyped(untitled, source.title_field, "--title-field",
                        " (no row has it; leave the option out for no titles)")
    hashes.append(np.array(chunk, dtype=np.uint64))
    _refuse_duplicates(source, np.concatenate(hashes))
    if plan.skipped:
        logger.warning("Skipped %d bad rows; first: %s", plan.skipped, plan.skipped_examples[0])
    return plan


def _mistyped(row: Row, name: str, option: str, note: str = "") -> CorpusError:
    """The error for a field that the first rows lack: the option names a field the corpus does not have, and
    --skip-bad-rows would skip every row, so the advice is to name another."""
    return CorpusError(f"{row.where}: {no_field(name, row.fields, option)}{note}")


def check_first_row(source: CorpusSource, *, skip_bad_rows: bool) -> None:
    """Before the model loads, the mistakes a first row shows: a missing input, a file type this reader does not
    read, a text column or field that is not there (a Hub dataset is read only once the job runs)."""
    if source.dataset is not None or is_hub_dataset(source.path):
        return
    first = next(iter_rows(source), None)
    if first is not None and first.problem is not None and not skip_bad_rows:
        raise _mistyped(first, *first.absent) if first.absent else _bad_row(source, first, any_good=False)


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
    digest = hashlib.blake2b(identifier.encode("utf-8"), digest_size=8).digest()
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
