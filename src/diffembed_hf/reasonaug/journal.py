"""The journal: every answer the server gave, appended to OUT/journal.jsonl as it arrives.

One JSON object per line: the request's `key`, its `stage` and `item` (for people reading the file), the request
`body` (model, messages, sampling settings) and the `answer`. The key is the SHA-256 of the body in canonical JSON,
so the same request always has the same key, and a rerun sends only requests whose key has no answer yet.

Each line is written with one `write` and flushed at once, so a killed process (SIGKILL included) loses nothing
that had arrived; `os.fsync` runs at most once a second and when the journal closes, so a power cut loses at most
the last second of answers, which a rerun sends again. A torn last line (the process died mid-write) is dropped
and cut off before anything is appended. A request that was sent but not answered when the process died is not in
the journal: a rerun sends it again (the only requests ever sent twice; at most --workers of them per kill).
Only one run may use a journal at a time (`files.output_lock` on OUT, which names the run holding it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ..errors import JournalError
from ..outputs import holds_lock, output_lock

logger = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
_FSYNC_SECONDS = 1.0


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_key(body: dict) -> str:
    """The stable identity of a request: SHA-256 of its body (model, messages, sampling settings)."""
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class Journal:
    """The answers of a run folder, read at open, appended to as they arrive; use as a context manager."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / JOURNAL
        self.answers: dict[str, dict] = {}
        self.torn_line = False
        self._held = contextlib.ExitStack()
        self._handle = None
        self._last_sync = 0.0

    def __enter__(self) -> Journal:
        self._lock()
        try:
            self._read()
            self._handle = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> None:
        if not holds_lock(self.path.parent):  # the run took it already, before checking its folder
            self._held.enter_context(output_lock(self.path.parent))

    def _read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        body, newline, tail = data.rpartition(b"\n")  # whole lines, and what follows the last newline
        for number, line in enumerate(body.split(b"\n") if newline else [], 1):
            record = _record(line)
            if record is None and line.strip():
                raise JournalError(f"{self.path} line {number}: not a journal record; the file was changed by "
                                   "something other than diffembed reasonaug")
            if record is not None:
                self.answers[record["key"]] = record
        if not tail.strip():
            return
        record = _record(tail)
        with open(self.path, "r+b") as handle:
            if record is not None:  # a whole record whose newline was not written: keep it, end its line
                self.answers[record["key"]] = record
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:  # a torn last line, written partly when the process was killed
                self.torn_line = True
                logger.info("%s: dropping the torn last line (%d bytes) of an interrupted run", self.path, len(tail))
                handle.truncate(len(body) + len(newline))
            os.fsync(handle.fileno())

    def append(self, record: dict) -> None:
        """Write one answer as one line, flushed now (fsync at most once a second)."""
        self._handle.write(canonical_json(record) + "\n")
        self._handle.flush()
        self.answers[record["key"]] = record
        now = time.monotonic()
        if now - self._last_sync >= _FSYNC_SECONDS:
            os.fsync(self._handle.fileno())
            self._last_sync = now

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        self._held.close()


def _record(line: bytes) -> dict | None:
    """A journal record, or None for a line that is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("answer"), dict):
        return record
    return None
