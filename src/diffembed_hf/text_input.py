"""Texts to embed, read the way a user counts them: one text per line, or one JSON object per line.

Lines end only at "\\n" (a "\\r\\n" ending loses its "\\r"); form feeds, vertical tabs, U+2028 and the other
characters that Python's `str.splitlines` also breaks at stay inside the text, so the number of embeddings always
equals the number of lines an editor or `wc -l` shows. A leading byte-order mark is dropped. JSON lines are read
from `.jsonl` / `.ndjson` / `.jsonlines` files, or from any input (stdin included) when `field` is given.
"""

from __future__ import annotations

import json
import sys

from .errors import DiffembedError, UsageError

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines")
DEFAULT_FIELD = "text"


def split_lines(text: str) -> list[str]:
    """One entry per "\\n"-terminated line; a final line without "\\n" counts, an empty input has none."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline: no extra empty line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read(source: str) -> str:
    try:
        if source == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        else:
            with open(source, "rb") as handle:
                data = handle.read()
    except FileNotFoundError:
        raise UsageError(f"--input {source}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--input {source} is a folder; give a text or JSON-lines file") from None
    except OSError as err:
        raise UsageError(f"--input {source}: {err.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DiffembedError(f"{_name(source)}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset "
                             f"{err.start})") from None


def _name(source: str) -> str:
    return "<stdin>" if source == "-" else source


def read_texts(source: str, field: str | None = None) -> list[str]:
    """The texts of `source` (a path or "-" for stdin), one per line; JSON lines give their `field`."""
    lines = split_lines(_read(source))
    if field is None and not source.lower().endswith(JSON_LINES_SUFFIXES):
        return lines
    field = field or DEFAULT_FIELD
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DiffembedError(f"{_name(source)}:{number}: empty line; JSON lines need one object per line")
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DiffembedError(f"{_name(source)}:{number}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise DiffembedError(f"{_name(source)}:{number}: a JSON {type(record).__name__}, expected an object "
                                 f"with a {field!r} field")
        if field not in record:
            raise DiffembedError(f"{_name(source)}:{number}: no field {field!r} (fields: {', '.join(record)}); "
                                 "choose one with --field")
        if not isinstance(record[field], str):
            raise DiffembedError(f"{_name(source)}:{number}: field {field!r} is a JSON "
                                 f"{type(record[field]).__name__}, expected a string")
        texts.append(record[field])
    return texts
