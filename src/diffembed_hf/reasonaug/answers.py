"""Reading the model's answers: the sections of a definition or a problem, and why an answer is unusable.

An answer is the journal's record of one chat completion: `content`, `refusal` (OpenAI's field for a declined
request), `finish_reason` and `usage`. Every unusable answer gets one of the `FAILURES` names, which the run counts
and reports; the pipeline retries the ones a new sample may fix (`RETRYABLE`) and drops the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .concepts import find_name, name_pattern

# Why an answer (or what was made from it) was not used. Counted per stage in the run's summary.
FAILURES = {
    "empty": "an empty answer",
    "refusal": "the model declined",
    "truncated": "cut off at the token limit (max_tokens)",
    "missing_sections": "without the expected sections",
    "names_concept": "the problem names its concept",
    "checker_no": "judged wrong by the checker",
    "duplicate": "a duplicate of an earlier problem",
}
RETRYABLE = {"empty", "refusal", "truncated", "missing_sections", "names_concept"}

_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i won'?t|i am unable|i'?m unable|"
                      r"as an ai)", re.IGNORECASE)


def _tag(name: str) -> re.Pattern:
    """A section tag as models write it: **Name**, **Name:**, **Name**:, a markdown heading `## Name`, or a line
    that begins `Name:`."""
    bold = rf"\*\*\s*{name}\s*:?\s*\*\*\s*:?"
    heading = rf"^[ \t]*#{{1,6}}[ \t]*{name}[ \t]*:?[ \t]*$"
    label = rf"^[ \t]*{name}[ \t]*:"
    return re.compile(f"(?:{bold}|{heading}|{label})", re.IGNORECASE | re.MULTILINE)


_CONCEPT, _DEFINITION = _tag("concept"), _tag("definition")
_PROBLEM, _SOLUTION = _tag("problem"), _tag("solution")


@dataclass(frozen=True)
class Parsed:
    """The sections of a usable answer, or the FAILURES name of an unusable one."""

    sections: tuple[str, ...] = ()
    failure: str | None = None


def answer_failure(answer: dict) -> str | None:
    """The failure every stage shares: nothing usable came back at all."""
    content = answer.get("content") or ""
    if answer.get("refusal"):
        return "refusal"
    if not content.strip():
        return "empty"
    if answer.get("finish_reason") == "length":
        return "truncated"
    return None


def _split(content: str, first: re.Pattern, second: re.Pattern) -> tuple[str, str] | None:
    start = first.search(content)
    if start is None:
        return None
    end = second.search(content, start.end())
    if end is None:
        return None
    head, tail = content[start.end():end.start()].strip(), content[end.end():].strip()
    return (head, tail) if head and tail else None


def _unusable(content: str) -> str:
    return "refusal" if _REFUSAL.match(content) else "missing_sections"


def parse_definition(answer: dict) -> Parsed:
    """(the definition text,) from "**Concept** name **Definition** text ..." (code sections stay in the text)."""
    failure = answer_failure(answer)
    if failure:
        return Parsed(failure=failure)
    content = answer["content"]
    split = _split(content, _CONCEPT, _DEFINITION)
    if split is None:
        return Parsed(failure=_unusable(content))
    return Parsed(sections=(split[1],))


def names_concept(text: str, concept: str) -> bool:
    """Whether the text names the concept (its name without a parenthesised part, or that part, e.g. DFS), in any
    spelling (`concepts.name_pattern`: "Bayes’ theorem" names "Bayes' Theorem")."""
    names = [re.sub(r"\s*\(.*?\)\s*", " ", concept).strip()] + re.findall(r"\((.*?)\)", concept)
    return any(len(name) > 2 and find_name(name_pattern(name), text) for name in names)


def parse_problem(answer: dict, concept: str) -> Parsed:
    """(problem, solution) from "**Problem** ... **Solution** ..."; a problem that names its concept is unusable
    (the query would give the answer away)."""
    failure = answer_failure(answer)
    if failure:
        return Parsed(failure=failure)
    content = answer["content"]
    split = _split(content, _PROBLEM, _SOLUTION)
    if split is None:
        return Parsed(failure=_unusable(content))
    if names_concept(split[0], concept):
        return Parsed(failure="names_concept")
    return Parsed(sections=split)
