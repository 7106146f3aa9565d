"""The user's input files, read one way by every command: `diffembed encode` file mode (`read_texts`), corpus mode
(`corpus.read`) and evaluate's BEIR folders (`evaluation.local`) open, decode, split and check through here, so
the same file gives the same texts whichever command reads it (docs/guides/input-files.md).

  * Names: `.jsonl`, `.ndjson` and `.jsonlines` are JSON lines, `.csv` is CSV, `.parquet` is parquet, whatever
    the case of the suffix; a `.gz` / `.bz2` / `.xz` ending is decompressed first (not for parquet, which
    compresses inside the file). Any other file is text, one text per line (file mode only).
  * Decoding: UTF-8, with or without a byte-order mark. Other bytes are refused, naming the file, line and
    byte, never guessed: Latin-1 or Windows-1252 decode any byte sequence, so a wrong guess would embed
    mojibake without a word. Corpus mode can skip such a row (--skip-bad-rows); a CSV header or a text file
    line cannot be skipped.
  * Lines end at "\\n" only ("\\r\\n" loses its "\\r"): U+2028, form feeds and the other breaks of
    `str.splitlines` stay inside a text. A blank JSON line is not a record (JSON lines readers skip them).
  * CSV: fields of any length (the csv module's 128 KiB default limit is raised for the process) and quoted
    newlines, as the csv module reads a file opened with newline="".
  * Texts and ids: a string holding a lone surrogate (JSON "\\ud800") is refused - no UTF-8 file, parquet
    column or tokenizer can hold it; an id is a non-empty string or an integer.
  * Folders (corpus mode): every input file below it, hidden ones (a name starting with ".") left out, in
    path order; any other file is named in a warning, never dropped silently.

Positions for resuming: a byte offset of the (decompressed) stream for JSON lines and CSV, a row index for
parquet. A compressed file cannot seek, so reaching an offset decompresses everything before it; a reader that
stops inside one leaves its handle open at that point (`_kept`), and the next reader of the same file - the
next corpus shard - continues from there, so a corpus in one `.jsonl.gz` is decompressed once, not per shard.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import numbers
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import DiffembedError, UsageError

logger = logging.getLogger(__name__)

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines")
FORMATS = {**dict.fromkeys(JSON_LINES_SUFFIXES, "jsonl"), ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
BOM = b"\xef\xbb\xbf"
CSV_FIELD_LIMIT = 2**31 - 1  # the largest a C long holds on every platform (Windows' is 32 bits)
DEFAULT_FIELD = "text"
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)  # a damaged or mislabelled compressed file
_JSON_SPACE = " \t\r"  # JSON's whitespace besides "\n": a line of only these is blank

Error = type[DiffembedError]


# --- names and opening ----------------------------------------------------------------------------------------

def compression(path: str | os.PathLike) -> str | None:
    """The compression suffix of `path` (".gz", ".bz2", ".xz"), whatever its case, or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in COMPRESSIONS if name.endswith(suffix)), None)


def input_format(path: str | os.PathLike) -> str | None:
    """"jsonl", "csv" or "parquet" from the name (case-insensitive, after a compression suffix), None for
    anything else (a text file in file mode, not an input in a corpus folder). A compressed parquet file is
    None: parquet compresses inside the file, and pyarrow reads it only as it is."""
    name = Path(path).name.lower()
    packed = compression(path)
    if packed:
        name = name[: -len(packed)]
    kind = next((kind for suffix, kind in FORMATS.items() if name.endswith(suffix)), None)
    return None if kind == "parquet" and packed else kind


def open_input(path: str | os.PathLike, error: Error = DiffembedError) -> IO[bytes]:
    """`path` opened for reading bytes, decompressed if its name says so; a missing file is named as missing."""
    opener = COMPRESSIONS.get(compression(path), open)
    try:
        return opener(path, "rb")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a file") from None
    except OSError as err:
        raise error(f"{path}: {err.strerror or err}") from None


def list_inputs(path: str | os.PathLike, error: Error = DiffembedError) -> tuple[list[Path], list[Path]]:
    """(the input files, the other files) of a file or folder. A folder's inputs are every .jsonl / .ndjson /
    .jsonlines / .csv / .parquet file below it (optionally .gz / .bz2 / .xz, any case), sorted by path (folder
    by folder, code-point order: "B.jsonl" before "a.jsonl"); hidden files and folders are left out, linked
    folders followed (once each). The caller warns about the other files, once."""
    root = Path(path)
    if root.is_file():
        if input_format(root) is None:
            raise error(f"{root}: not an input file; name it .jsonl / .ndjson / .jsonlines, .csv or .parquet "
                        "(.gz / .bz2 / .xz for compressed JSON lines or CSV)")
        return [root], []
    if not root.is_dir():
        raise error(f"{path}: no such file or folder")
    inputs, others = [], []
    for folder, names in _walk(root):
        for name in names:
            if not name.startswith("."):
                candidate = Path(folder, name)
                (inputs if input_format(name) and candidate.is_file() else others).append(candidate)
    if not inputs:
        raise error(f"{root}/ holds no .jsonl, .ndjson, .jsonlines, .csv or .parquet file (compressed or not)"
                    + (f"; it holds {describe_files(others, root)}" if others else ""))
    return sorted(inputs), sorted(others)


def _walk(root: Path):
    """(folder, file names) of every folder an input folder's reading visits: hidden folders left out, linked
    folders followed, each real folder once."""
    seen = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):  # linked folders are read, each once
        if os.path.realpath(folder) in seen:
            subfolders[:] = []
            continue
        seen.add(os.path.realpath(folder))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        yield folder, names


def read_folders(root: str | os.PathLike) -> list[Path]:
    """The real paths of the folders that reading the input folder `root` visits, those its links lead to
    included: an output in any of them would be read back as input by the next run."""
    return [Path(os.path.realpath(folder)) for folder, _ in _walk(Path(root))]


def describe_files(paths: list[Path], root: Path, limit: int = 5) -> str:
    """"a.txt, notes/b.md and 3 more": for a one-line message."""
    names = [path.relative_to(root).as_posix() for path in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(names) + more


# --- lines ----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Line:
    number: int | None  # 1-based; None when reading began inside the file (the lines before were not counted)
    offset: int  # where the line starts, in bytes of the (decompressed) file
    end: int  # where the next line starts
    text: str  # without its "\n" or "\r\n"
    ending: str  # "\n", "\r\n" or "" (the last line of a file that does not end with a newline)
    problem: str | None = None  # "not UTF-8 (...)" when the bytes are not UTF-8; `text` then holds U+FFFD

    def where(self, name: str | os.PathLike) -> str:
        return f"{name} line {self.number}" if self.number is not None else f"{name} byte {self.offset}"


def read_lines(handle: IO[bytes], name: str | os.PathLike, *, start: int = 0,
               error: Error = DiffembedError) -> Iterator[Line]:
    """The lines of a binary stream from byte `start` (a line start), decoded as UTF-8; a byte-order mark at
    the very start of the file is dropped."""
    if start:
        _seek(handle, start, name, error)
    number, offset = (0 if start == 0 else None), start
    while True:
        try:
            raw = handle.readline()
        except _READ_ERRORS as err:
            raise error(f"{name}: cannot be read ({_reason(err)})") from None
        if not raw:
            return
        end = offset + len(raw)
        number = None if number is None else number + 1
        skip = len(BOM) if offset == 0 and raw.startswith(BOM) else 0
        ending = "\r\n" if raw.endswith(b"\r\n") else "\n" if raw.endswith(b"\n") else ""
        body = raw[skip: len(raw) - len(ending)]
        try:
            text, problem = body.decode("utf-8"), None
        except UnicodeDecodeError as err:
            text = body.decode("utf-8", "replace")
            problem = (f"not UTF-8 (byte {body[err.start]:#04x} at byte offset {offset + skip + err.start}); save "
                       "the file as UTF-8")
        yield Line(number, offset, end, text, ending, problem)
        offset = end


def _seek(handle: IO[bytes], offset: int, name, error: Error) -> None:
    try:
        handle.seek(offset)
    except _READ_ERRORS as err:
        raise error(f"{name}: cannot be read ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    if isinstance(err, EOFError):
        return "the compressed data ends early: the file is truncated"
    return str(err) or type(err).__name__


# A compressed file left open where its last reader stopped: path -> (handle, the file's identity). See the module
# docstring; one at most (shards are read in order, so only the file being read is worth keeping).
_kept: dict[Path, tuple[IO[bytes], tuple]] = {}


def _file_identity(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def lines_at(path: Path, offset: int = 0, error: Error = DiffembedError) -> Iterator[Line]:
    """The lines of the file `path` from byte `offset`; a compressed file continues a kept handle when it can."""
    kept, identity = _kept.pop(path, (None, None)) if compression(path) else (None, None)
    if kept is not None and (identity != _file_identity(path) or kept.tell() > offset):
        kept.close()
        kept = None
    handle = kept or open_input(path, error)
    try:
        yield from read_lines(handle, path, start=offset, error=error)
    except GeneratorExit:  # the reader stopped inside the file: a compressed handle stays open for the next one
        identity = _file_identity(path) if compression(path) else None
        if identity is not None:
            for old, _ in _kept.values():
                old.close()
            _kept.clear()
            _kept[path] = (handle, identity)
            handle = None
        raise
    finally:
        if handle is not None:
            handle.close()


# --- records --------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Record:
    data: dict | None  # None when the record cannot be read; `problem` says why
    where: str  # "corpus.jsonl line 17": for messages
    offset: int  # where it starts: bytes (JSON lines, CSV) or rows (parquet)
    problem: str | None = None


def json_records(lines: Iterable[Line], name: str | os.PathLike) -> Iterator[Record]:
    """One JSON object per non-blank line."""
    name = str(name)
    for line in lines:
        if line.problem is not None:
            yield Record(None, line.where(name), line.offset, line.problem)
            continue
        if not line.text or line.text[0] in _JSON_SPACE and not line.text.strip(_JSON_SPACE):
            continue
        try:
            data = json.loads(line.text)
        except ValueError as err:
            yield Record(None, line.where(name), line.offset, f"not valid JSON ({err})")
            continue
        if not isinstance(data, dict):
            yield Record(None, line.where(name), line.offset,
                         f"a JSON {type(data).__name__}, expected an object (one per line)")
            continue
        yield Record(data, line.where(name), line.offset)


def allow_long_csv_fields() -> None:
    """The csv module refuses fields over 131,072 characters by default (one long document); raise the limit
    for the process, never lower it."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


def csv_header(path: Path, error: Error = DiffembedError) -> list[str]:
    """The column names of a CSV file (its first non-blank record); read on a handle of its own, so a compressed
    file's kept handle stays where it is."""
    allow_long_csv_fields()
    with open_input(path, error) as handle:
        lines = read_lines(handle, path, error=error)
        last: list[Line] = []

        def texts() -> Iterator[str]:
            for line in lines:
                if line.problem is not None:
                    raise error(f"{line.where(path)} (the header): {line.problem}")
                last[:] = [line]
                yield line.text + line.ending

        try:
            return next((values for values in csv.reader(texts()) if values), [])
        except csv.Error as err:
            raise error(f"{last[0].where(path) if last else path} (the header): not valid CSV ({err})") from None


def csv_records(path: Path, offset: int = 0, error: Error = DiffembedError) -> Iterator[Record]:
    """The rows of a CSV file as {column: value} from byte `offset` (a row start; the header is read apart). As
    csv.DictReader: a short row's missing values are None; a row with more values than the header (an unquoted
    comma, most often) is a bad row, not a silently cut one."""
    header = csv_header(path, error)
    lines = lines_at(path, offset, error)
    consumed: list[Line] = []  # the lines the csv module took for the row being read
    name = str(path)

    def texts() -> Iterator[str]:
        for line in lines:
            consumed.append(line)
            yield line.text + line.ending

    reader = csv.reader(texts())
    in_header = offset == 0
    try:
        while True:
            consumed.clear()
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise error(f"{consumed[0].where(name) if consumed else name}: not valid CSV ({err})") from None
            if not values or in_header:
                in_header = in_header and not values
                continue
            start, problem, data = consumed[0], None, None
            for line in consumed:
                problem = problem or line.problem
            if problem is None and len(values) > len(header):
                problem = f"{len(values)} fields, the header has {len(header)} (an unquoted comma?)"
            if problem is None:
                data = dict(zip(header, values + [None] * (len(header) - len(values))))
            yield Record(data, start.where(name), start.offset, problem)
    finally:
        lines.close()


def parquet_columns(path: Path, error: Error = DiffembedError) -> list[str]:
    return _parquet_file(path, error).schema_arrow.names


def _parquet_file(path: Path, error: Error):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise error(f"{path}: not a readable parquet file ({err})") from None


def parquet_records(path: Path, offset: int = 0, columns: list[str] | None = None,
                    error: Error = DiffembedError) -> Iterator[Record]:
    """The rows of a parquet file from row `offset`: whole row groups before it are skipped unread."""
    parquet = _parquet_file(path, error)
    names = parquet.schema_arrow.names
    wanted = names if columns is None else [c for c in dict.fromkeys(columns) if c in names]
    first_group, row = 0, 0
    while first_group < parquet.num_row_groups and row + parquet.metadata.row_group(first_group).num_rows <= offset:
        row += parquet.metadata.row_group(first_group).num_rows
        first_group += 1
    groups = list(range(first_group, parquet.num_row_groups))
    name = str(path)
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=wanted) if groups else ():
        for data in batch.to_pylist():
            if row >= offset:
                yield Record(data, f"{name} row {row + 1}", row)
            row += 1


def columns_of(path: Path, error: Error = DiffembedError) -> list[str] | None:
    """The column names of a CSV or parquet file; None for JSON lines (each record has its own)."""
    kind = input_format(path)
    if kind == "csv":
        return csv_header(path, error)
    if kind == "parquet":
        return parquet_columns(path, error)
    return None


def read_records(path: Path, offset: int = 0, *, columns: list[str] | None = None,
                 error: Error = DiffembedError) -> Iterator[Record]:
    """The records of an input file from `offset`, whatever its format; `columns` limits what parquet reads."""
    kind = input_format(path)
    if kind == "jsonl":
        return json_records(lines_at(path, offset, error), path)
    if kind == "csv":
        return csv_records(path, offset, error)
    if kind == "parquet":
        return parquet_records(path, offset, columns, error)
    raise error(f"{path}: not a JSON-lines, CSV or parquet file")


# --- values ---------------------------------------------------------------------------------------------------

def surrogate_problem(value: str, what: str) -> str | None:
    """Why `value` cannot be embedded or stored: a lone surrogate (from a JSON "\\ud800" escape), or None. (Only
    a surrogate stops UTF-8 encoding; encoding is ~20x faster than a regular expression over the text.)"""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"{what} holds a lone surrogate U+{ord(value[err.start]):04X} at character {err.start}, which no "
                "UTF-8 text can hold")
    return None


def check_text(value: Any, what: str) -> str | None:
    """None for a string that can be embedded; else what is wrong with it."""
    if value is None:
        return f"{what} is missing"
    if not isinstance(value, str):
        return f"{what} is {type(value).__name__} ({value!r:.60}), expected a string"
    return surrogate_problem(value, what)


def check_id(value: Any, what: str) -> tuple[str | None, str | None]:
    """(the id as a string, None), or (None, what is wrong): an id is a non-empty string or an integer."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)) or value == "":
        return None, f"{what} is {'missing' if value is None else repr(value)[:60]}"
    identifier = str(value)
    problem = surrogate_problem(identifier, what)
    return (None, problem) if problem else (identifier, None)


def no_field(field: str, fields: Iterable, option: str) -> str:
    """The advice for a field the input does not have: name another (never "skip the rows": that skips all)."""
    return f"no field {field!r} (fields: {', '.join(map(str, fields)) or 'none'}); choose one with {option}"


# --- file mode ------------------------------------------------------------------------------------------------

def read_texts(source: str, field: str | None = None) -> list[str]:
    """The texts of `source` (a path, or "-" for stdin): one per line of a text file; the `field` (default
    "text") of each JSON line, CSV row or parquet row. JSON lines are read from a JSON-lines name or, given
    `field`, from any text input. Any problem stops the read, naming the file and line."""
    if source == "-":
        stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else io.BytesIO(
            sys.stdin.read().encode("utf-8", "surrogatepass"))
        return _texts(read_lines(stream, "<stdin>"), "<stdin>", field, "jsonl" if field else None)
    path = Path(source)
    if not path.exists():
        raise UsageError(f"--input {source}: no such file")
    if path.is_dir():
        raise UsageError(f"--input {source} is a folder; give a file (a folder of corpus files is read in corpus "
                         "mode: give --output a folder)")
    if path.name.lower().endswith(tuple(".parquet" + suffix for suffix in COMPRESSIONS)):
        raise UsageError(f"--input {source}: parquet compresses inside the file; decompress it first")
    kind = input_format(path) or ("jsonl" if field else None)
    if kind in ("csv", "parquet"):
        field = field or DEFAULT_FIELD
        columns = columns_of(path)
        if field not in columns:
            raise DiffembedError(f"{path}: {no_field(field, columns, '--field')}")
        return _field_values(read_records(path, columns=[field]), field)
    return _texts(lines_at(path), path, field, kind)


def _texts(lines: Iterator[Line], name, field: str | None, kind: str | None) -> list[str]:
    if kind == "jsonl":
        return _field_values(json_records(lines, name), field or DEFAULT_FIELD)
    texts = []
    for line in lines:
        if line.problem:
            raise DiffembedError(f"{line.where(name)}: {line.problem}")
        texts.append(line.text)
    return texts


def _field_values(records: Iterator[Record], field: str) -> list[str]:
    texts = []
    for record in records:
        if record.problem is None and field not in record.data:
            raise DiffembedError(f"{record.where}: {no_field(field, record.data, '--field')}")
        problem = record.problem or check_text(record.data[field], f"field {field!r}")
        if problem:
            raise DiffembedError(f"{record.where}: {problem}")
        texts.append(record.data[field])
    return texts
