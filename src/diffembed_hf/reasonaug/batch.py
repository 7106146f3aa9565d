"""The OpenAI Batch API path: write the pending requests as a batch input file, read a batch output file back.

Input lines: {"custom_id": KEY, "method": "POST", "url": "/v1/chat/completions", "body": {...}}, where KEY is the
request's journal key, so an output line finds its request whatever order the results come in. Output lines:
{"custom_id", "response": {"status_code", "body": <chat completion>}, "error"}; a line with an error or a status
other than 200 is counted and not journaled (the request stays pending and goes into the next batch file). A
custom_id on two lines is refused: which answer a user meant is not ours to guess.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..errors import BatchError, UsageError
from ..outputs import move_into_place, temporary_sibling
from ..readers import json_records, open_input, read_lines
from ..validation import is_non_negative_int
from .client import answer_of

BATCH_LIMIT = 50_000  # requests per batch input file (the Batch API's limit)


def write_batch_input(path: Path, requests: list, *, overwrite: bool) -> None:
    """The requests as a Batch API input file, written whole."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"--batch-file {path} exists; pass --overwrite to replace it")
    if len(requests) > BATCH_LIMIT:
        raise UsageError(f"{len(requests)} requests are pending, more than the {BATCH_LIMIT} a batch file may hold; "
                         "split the concepts file into smaller runs")
    tmp = temporary_sibling(path, "partial")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for request in requests:
                handle.write(json.dumps({"custom_id": request.key, "method": "POST", "url": "/v1/chat/completions",
                                         "body": request.body}, ensure_ascii=False) + "\n")
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _kind(value) -> str:
    """A JSON value as a message names it: `a string 'rate limited'`, `a list`."""
    if isinstance(value, str):
        return f"a string {value[:60]!r}" + ("..." if len(value) > 60 else "")
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _object(value, field: str, where: str, *, null: bool = False) -> dict:
    """`value` when it is a JSON object (or null, as {}, where `null`); else a BatchError naming the line."""
    if value is None and null:
        return {}
    if not isinstance(value, dict):
        raise BatchError(f"{where}: {field} is {_kind(value)}, not a JSON object{' or null' if null else ''} "
                         "(a Batch API output line: {custom_id, response: {status_code, body}, error})")
    return value


def _text(value, field: str, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BatchError(f"{where}: {field} is {_kind(value)}, not a string or null")
    return value


def _count(value, field: str, where: str) -> int:
    if value is not None and not is_non_negative_int(value):
        raise BatchError(f"{where}: {field} is {_kind(value)}, not a token count")
    return value or 0


def _failure(error, response: dict) -> str:
    """How a failed line is counted: its HTTP status, the Batch API's error code, or the message of a server that
    writes the error as text (vLLM's run_batch does)."""
    status = response.get("status_code")
    if status is not None and status != 200:
        return f"HTTP {status}"
    if isinstance(error, str) and error.strip():
        return error.strip().splitlines()[0][:80]
    if isinstance(error, dict) and error.get("code"):
        return str(error["code"])
    return "error" if error else "no response"


def _completion(body: dict, where: str) -> SimpleNamespace:
    """A chat completion read from a batch output line, in the shape `answer_of` reads (the one place that makes
    the journal's answers), every field it reads checked for its type first."""
    choices = body.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise BatchError(f"{where}: response.body.choices is {_kind(choices)}, not a list")
    first = [] if not choices else [_object(choices[0], "response.body.choices[0]", where)]
    messages = [_object(c.get("message"), "response.body.choices[0].message", where, null=True) for c in first]
    usage = body.get("usage")
    if usage is not None:
        usage = _object(usage, "response.body.usage", where)
        usage = SimpleNamespace(**{name: _count(usage.get(name), f"response.body.usage.{name}", where)
                                   for name in ("prompt_tokens", "completion_tokens")})
    return SimpleNamespace(
        model=_text(body.get("model"), "response.body.model", where), usage=usage,
        choices=[SimpleNamespace(
            finish_reason=_text(choice.get("finish_reason"), "response.body.choices[0].finish_reason", where),
            message=SimpleNamespace(**{name: _text(message.get(name), f"response.body.choices[0].message.{name}",
                                                   where) for name in ("content", "refusal")}))
            for choice, message in zip(first, messages)])


@dataclass
class BatchResults:
    """The answers of a batch output file by custom_id, and the lines that carried none."""

    answers: dict[str, dict] = field(default_factory=dict)
    failed: Counter = field(default_factory=Counter)


def read_batch_output(path: Path) -> BatchResults:
    """The answers of a Batch API output file; a line that is not UTF-8, not JSON or not of the output's shape is
    refused, naming the file and line (as every input file is read: `readers`)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--from-batch-output {path}: no such file")
    results = BatchResults()
    first_seen: dict[str, str] = {}  # custom_id -> where its line is
    with open_input(path, BatchError) as handle:
        for record in json_records(read_lines(handle, path, error=BatchError), path):
            if record.problem is not None:
                raise BatchError(f"{record.where}: {record.problem}")
            line, where = record.data, record.where
            if not isinstance(line.get("custom_id"), str):
                raise BatchError(f"{where}: not a Batch API output line (no custom_id)")
            key = line["custom_id"]
            if key in first_seen:  # which of two answers to keep is not ours to guess
                raise BatchError(f"{where}: custom_id {key} is on {first_seen[key]} too; a batch output holds one "
                                 "line per request: give each batch's output file to a run of its own")
            first_seen[key] = where
            response = _object(line.get("response"), "response", where, null=True)
            error = line.get("error")
            if error is not None and not isinstance(error, (dict, str)):
                raise BatchError(f"{where}: error is {_kind(error)}, not a JSON object, a string or null")
            if error or response.get("status_code") != 200:
                results.failed[_failure(error, response)] += 1
                continue
            completion = _completion(_object(response.get("body"), "response.body", where), where)
            try:
                results.answers[key] = answer_of(completion)
            except ValueError:  # no choices
                results.failed["no choices"] += 1
    return results
