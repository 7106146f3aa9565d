"""The concepts file: domains, each with a question type and its concepts (plus optional topics and references).

```yaml
domains:
  algorithm:
    question_type: coding          # "coding" gets code definitions and a code-extracting checker
    references: [LeetCode, Codeforces contests]   # optional: "as hard as a problem from ..."
    topics: [logistics, a game or a puzzle]       # optional: settings that vary the problems
    concepts: [Two Pointers, Prefix Sum, Dijkstra's Algorithm]
```

JSON with the same structure works too. A concept names one thing the problems must need; two spellings of the
same name (case, spacing) anywhere in the file are one concept listed twice, which is refused: rows are keyed by
concept, and hard negatives must never be the positive's own concept under another name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConceptsError

_DOMAIN_KEYS = {"question_type", "concepts", "topics", "references"}



@dataclass(frozen=True)
class Domain:
    """One domain of the concepts file: its concepts share a question type and compete as hard negatives."""

    name: str
    question_type: str
    concepts: tuple[str, ...]
    topics: tuple[str, ...] = ()
    references: tuple[str, ...] = ()

    @property
    def coding(self) -> bool:
        return self.question_type.strip().lower() == "coding"


@dataclass(frozen=True)
class ConceptSet:
    """The parsed file: domains in file order, and the digest of its content (part of a run's identity)."""

    domains: tuple[Domain, ...]
    source: str
    sha256: str

    def __iter__(self):
        return iter(self.domains)

    @property
    def concepts(self) -> list[tuple[Domain, str]]:
        return [(domain, concept) for domain in self.domains for concept in domain.concepts]


def normalize_name(name: str) -> str:
    """The form two names are compared in: case-folded, runs of white space as one space."""
    return re.sub(r"\s+", " ", name).strip().casefold()


def _strings(value, where: str, source: str, *, required: bool) -> tuple[str, ...]:
    if value is None:
        if required:
            raise ConceptsError(f"{source}: {where} is missing")
        return ()
    if isinstance(value, str) or not isinstance(value, list):
        raise ConceptsError(f"{source}: {where} must be a list of strings, got {type(value).__name__}")
    items = []
    for number, item in enumerate(value, 1):
        if not isinstance(item, str) or not item.strip():
            raise ConceptsError(f"{source}: {where} item {number} is {item!r}, not a non-empty string")
        items.append(re.sub(r"\s+", " ", item).strip())
    if required and not items:
        raise ConceptsError(f"{source}: {where} is empty")
    return tuple(items)


def parse_concepts(data, source: str = "concepts", sha256: str = "") -> ConceptSet:
    """Check the structure of an already-read concepts file and return it; every problem names its place."""
    if data is None or data == {} or data == []:
        raise ConceptsError(f"{source}: the file is empty; it needs `domains:` with at least one domain")
    if not isinstance(data, dict) or "domains" not in data:
        raise ConceptsError(f"{source}: expected a mapping with a `domains:` key at the top")
    extra = set(data) - {"domains"}
    if extra:
        raise ConceptsError(f"{source}: unknown top-level key(s) {sorted(extra)}; only `domains` is read")
    domains_data = data["domains"]
    if not isinstance(domains_data, dict) or not domains_data:
        raise ConceptsError(f"{source}: `domains` must map domain names to their settings, and name at least one")
    seen: dict[str, tuple[str, str]] = {}
    domains = []
    for name, settings in domains_data.items():
        if not isinstance(name, str) or not name.strip():
            raise ConceptsError(f"{source}: a domain name is {name!r}, not a non-empty string")
        if not isinstance(settings, dict):
            raise ConceptsError(f"{source}: domain {name!r} must be a mapping with question_type and concepts")
        unknown = set(settings) - _DOMAIN_KEYS
        if unknown:
            raise ConceptsError(f"{source}: domain {name!r} has unknown key(s) {sorted(unknown)}; known: "
                                f"{sorted(_DOMAIN_KEYS)}")
        question_type = settings.get("question_type")
        if not isinstance(question_type, str) or not question_type.strip():
            raise ConceptsError(f"{source}: domain {name!r} needs a question_type (e.g. coding, math, physics)")
        concepts = _strings(settings.get("concepts"), f"domain {name!r}: concepts", source, required=True)
        for concept in concepts:
            key = normalize_name(concept)
            if key in seen:
                first, first_domain = seen[key]
                raise ConceptsError(f"{source}: the concept {concept!r} (domain {name!r}) is listed twice: {first!r} "
                                    f"(domain {first_domain!r}) is the same concept; list every concept once")
            seen[key] = (concept, name)
        domains.append(Domain(
            name=name.strip(), question_type=question_type.strip(), concepts=concepts,
            topics=_strings(settings.get("topics"), f"domain {name!r}: topics", source, required=False),
            references=_strings(settings.get("references"), f"domain {name!r}: references", source, required=False),
        ))
    return ConceptSet(domains=tuple(domains), source=source, sha256=sha256)


def read_structured_file(path: Path, what: str, error: type[Exception]):
    """A .yaml / .yml / .json file's content (PyYAML comes with transformers); errors name the file and line."""
    if not path.is_file():
        raise error(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise error(f"{path}: the {what} file is empty")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise error(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise error(f"{path}: a {what} file is .yaml, .yml or .json, got {path.suffix or 'no suffix'}")
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None


def load_concepts(path: str | Path) -> ConceptSet:
    """Read and check a concepts file (.yaml / .yml / .json)."""
    path = Path(path)
    data = read_structured_file(path, "concepts", ConceptsError)
    return parse_concepts(data, source=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
