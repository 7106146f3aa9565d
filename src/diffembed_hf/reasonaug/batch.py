"""The OpenAI Batch API path: write the pending requests as a batch input file, read a batch output file back.

Input lines: {"custom_id": KEY, "method": "POST", "url": "/v1/chat/completions", "body": {...}}, where KEY is the
request's journal key, so an output line finds its request whatever order the results come in. Output lines:
{"custom_id", "response": {"status_code", "body": <chat completion>}, "error"}; a line with an error or a status
other than 200 is counted and not journaled (the request stays pending and goes into the next batch file).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BatchError, UsageError
from ..files import move_into_place, temporary_sibling
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


class _Completion:
    """A chat completion read from a batch output line, in the shape `answer_of` reads."""

    def __init__(self, body: dict):
        self.model = body.get("model")
        self.choices = [_Choice(c) for c in body.get("choices") or []]
        usage = body.get("usage")
        self.usage = None if not isinstance(usage, dict) else _Usage(usage)


class _Choice:
    def __init__(self, choice: dict):
        message = choice.get("message") or {}
        self.finish_reason = choice.get("finish_reason")
        self.message = type("Message", (), {"content": message.get("content"), "refusal": message.get("refusal")})()


class _Usage:
    def __init__(self, usage: dict):
        self.prompt_tokens = usage.get("prompt_tokens") or 0
        self.completion_tokens = usage.get("completion_tokens") or 0


@dataclass
class BatchResults:
    """The answers of a batch output file by custom_id, and the lines that carried none."""

    answers: dict[str, dict] = field(default_factory=dict)
    failed: Counter = field(default_factory=Counter)


def read_batch_output(path: Path) -> BatchResults:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--from-batch-output {path}: no such file")
    results = BatchResults()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BatchError(f"{path} line {number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
                raise BatchError(f"{path} line {number}: not a Batch API output line (no custom_id)")
            response = record.get("response") or {}
            if record.get("error") or response.get("status_code") != 200:
                error = record.get("error") or {}
                results.failed[f"HTTP {response.get('status_code')}" if response else
                               str(error.get("code") or "error")] += 1
                continue
            try:
                results.answers[record["custom_id"]] = answer_of(_Completion(response.get("body") or {}))
            except ValueError:
                results.failed["no choices"] += 1
    return results
