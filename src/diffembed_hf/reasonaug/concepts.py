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
same name anywhere in the file are one concept listed twice, which is refused: rows are keyed by concept, and hard
negatives must never be the positive's own concept under another name.

Spellings of a name are compared here, in one way for every stage (`same_name` for the concepts file,
`name_pattern` for a problem that names its concept, `fold` for duplicate problems): Unicode NFKC, accents,
typographic quotes and dashes folded, case, hyphen / space / no separator between words, apostrophes, and a
plural or possessive -s. "Bayes’ theorem", "bayes theorem" and "Bayes's Theorem" are one name; so are
"Inclusion–Exclusion Principle" and "inclusion exclusion principles".
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConceptsError
from ..readers import read_lines

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


# Typographic quotes, primes and dashes as the ASCII character a keyboard gives (NFKC leaves them as they are).
_TYPOGRAPHY = str.maketrans({**{c: "'" for c in "\u2018\u2019\u201a\u201b\u2032\u02bc\u00b4`"},
                             **{c: '"' for c in "\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb"},
                             **{c: "-" for c in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2043\ufe58\ufe63"}})
_ACCENTS = re.compile("[\u0300-\u036f]")  # combining diacritical marks (of Latin, Greek, Cyrillic letters)
_TOKEN = re.compile(r"[^\W_]+|[^\w\s\"-]")  # a word, or one symbol (A*, C++, Node.js); quotes, -, _ separate
_SEPARATOR = r"[\s\-_]*"  # between the words of a name: a space, a hyphen, an underscore or nothing
_PLURAL = re.compile(r"(?:(?<=[sxz])|(?<=ch)|(?<=sh))es$|(?<!s)s$")


def fold(text: str) -> str:
    """The form every stage compares text in (names, problems): NFKC, accents dropped, typographic quotes and
    dashes as ' " -, case-folded. A model writes "Bayes’ theorem" or "inclusion–exclusion" as readily as the
    concepts file's ASCII spelling."""
    text = _ACCENTS.sub("", unicodedata.normalize("NFKD", text))
    return unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY).casefold()


def _tokens(text: str) -> list[str]:
    """The words and symbols of folded text; apostrophes dropped (Dijkstra's -> dijkstras, Bayes' -> bayes)."""
    return _TOKEN.findall(text.replace("'", ""))


@functools.lru_cache(maxsize=4096)
def name_pattern(name: str) -> re.Pattern:
    """A regex that finds `name` in folded text (see `fold`) in any spelling: words separated by a space, a hyphen
    or nothing, each word (of three letters or more) with or without a plural or possessive -s / -es."""
    parts = []
    for token in _tokens(fold(name)):
        if token.isalpha() and len(token) >= 3:
            parts.append(re.escape(_PLURAL.sub("", token) if len(token) > 3 else token) + "e?s?s?")
        else:
            parts.append(re.escape(token))
    return re.compile(r"(?<![^\W_])" + _SEPARATOR.join(parts) + r"(?![^\W_])")


def find_name(pattern: re.Pattern, text: str) -> bool:
    """Whether `text` holds the name of `pattern` (made by `name_pattern`) in any spelling."""
    return pattern.search(" ".join(_tokens(fold(text)))) is not None


def same_name(first: str, second: str) -> bool:
    """Whether two names are spellings of one name (each names the other, whole)."""
    first_text, second_text = " ".join(_tokens(fold(first))), " ".join(_tokens(fold(second)))
    return (name_pattern(first).fullmatch(second_text) is not None
            or name_pattern(second).fullmatch(first_text) is not None)


def normalize_name(name: str) -> str:
    """A coarse key of a name: every spelling `same_name` accepts has the same key (folded, separators,
    apostrophes and every s and e dropped), so that only names with one key need comparing."""
    return re.sub(r"[se]", "", "".join(_tokens(fold(name))))


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
    seen: dict[str, list[tuple[str, str]]] = {}
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
            listed = seen.setdefault(normalize_name(concept), [])
            for first, first_domain in listed:
                if same_name(first, concept):
                    raise ConceptsError(f"{source}: the concept {concept!r} (domain {name!r}) is listed twice: "
                                        f"{first!r} (domain {first_domain!r}) is the same concept; list every "
                                        "concept once")
            listed.append((concept, name))
        domains.append(Domain(
            name=name.strip(), question_type=question_type.strip(), concepts=concepts,
            topics=_strings(settings.get("topics"), f"domain {name!r}: topics", source, required=False),
            references=_strings(settings.get("references"), f"domain {name!r}: references", source, required=False),
        ))
    return ConceptSet(domains=tuple(domains), source=source, sha256=sha256)


class _AliasFound(Exception):
    """A YAML alias (*name), raised by `_yaml_loader` before the alias is resolved."""

    def __init__(self, anchor: str, line: int):
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """PyYAML's safe loader, refusing aliases: a few hundred bytes of nested aliases ("billion laughs") expand to
    gigabytes, and a concepts or prompts file has no use for them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _AliasFound(event.anchor, event.start_mark.line + 1)
            return super().compose_node(parent, index)

    return Loader


class StructuredFileError(ValueError):
    """A concepts or prompts file that cannot be read as YAML or JSON; the message names the file and line."""


def _text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark dropped); other bytes are refused naming the file, line and byte,
    as every input file is read (`readers`)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        bad = next(line for line in read_lines(io.BytesIO(data), path) if line.problem is not None)
        raise StructuredFileError(f"{bad.where(path)}: {bad.problem}") from None


def read_structured_file(path: Path, what: str):
    """A .yaml / .yml / .json file's content (PyYAML comes with transformers); `StructuredFileError` names the
    file and line, and each caller raises it as its own file's error."""
    if not path.is_file():
        raise StructuredFileError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    text = _text(path)
    if not text.strip():
        raise StructuredFileError(f"{path}: the {what} file is empty")
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise StructuredFileError(f"{path}: a {what} file is .yaml, .yml or .json, got {path.suffix or 'no suffix'}")
    try:
        if path.suffix.lower() == ".json":
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise StructuredFileError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        import yaml

        try:
            return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader that also refuses aliases
        except _AliasFound as alias:
            raise StructuredFileError(f"{path} line {alias.line}: a YAML alias (*{alias.anchor}); a {what} file "
                                      "cannot use aliases (a few bytes of them can expand to gigabytes): write the "
                                      "value out") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", None) or err
            raise StructuredFileError(f"{path}{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise StructuredFileError(f"{path}: nested too deeply to be a {what} file") from None


def load_concepts(path: str | Path) -> ConceptSet:
    """Read and check a concepts file (.yaml / .yml / .json)."""
    path = Path(path)
    try:
        data = read_structured_file(path, "concepts")
    except StructuredFileError as err:
        raise ConceptsError(str(err)) from None
    return parse_concepts(data, source=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
