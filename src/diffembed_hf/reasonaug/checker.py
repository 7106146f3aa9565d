"""The checker's verdict on a (problem, solution) pair, by the study's rules.

Coding: the checker answers with the corrected code in a fenced block, which becomes the solution, or "NO".
Every other question type: the answer must begin with "yes". A verdict is final (a "no" is not asked again);
an empty answer or a refusal is no verdict, and the pipeline asks again (with a new sampling seed).
"""

from __future__ import annotations

import re

from .answers import Parsed, answer_failure

_CODE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.IGNORECASE | re.DOTALL)
_FIRST_WORD = re.compile(r"^[\W_]*([A-Za-z]+)")


def first_word(text: str) -> str:
    """The first word, past any markdown or punctuation ("**YES**." -> "yes")."""
    match = _FIRST_WORD.match(text)
    return match.group(1).lower() if match else ""


def verdict(answer: dict, *, coding: bool, solution: str) -> Parsed:
    """Parsed((solution,)) when the pair passes (coding: the checker's code replaces the solution), else a
    failure: "checker_no" for a verdict against it, or the shared failure of an answer that gave none."""
    failure = answer_failure(answer)
    if failure == "truncated" and not coding:  # "YES" followed by a long explanation still answered
        failure = None
    if failure:
        return Parsed(failure=failure)
    content = answer["content"].strip()
    word = first_word(content)
    if coding:
        if word == "no":
            return Parsed(failure="checker_no")
        code = _CODE.search(content)
        if code is None or not code.group(1).strip():
            return Parsed(failure="checker_no")
        return Parsed(sections=(code.group(1).strip("\n"),))
    return Parsed(sections=(solution,)) if word == "yes" else Parsed(failure="checker_no")
