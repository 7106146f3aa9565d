"""The prompts, the topic and reference lists and the row instructions: one YAML file shipped with the package
(`prompts.yaml`), which `--prompts FILE` overrides key by key. Every request's messages are built here."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import PromptsError
from .concepts import Domain, StructuredFileError, read_structured_file

STAGES = ("definition", "problem", "check")
ROW_KINDS = ("p2i", "p2ps", "ps2ps", "i2ps")
_FIELDS = ("domain", "question_type", "concept", "topic", "reference", "problem", "solution")
# What a prompt cannot do without: the concept it is about, and for the checker the pair it judges.
_REQUIRED = {"definition": ("concept",), "problem": ("concept",), "check": ("problem", "solution")}
# The fields each text is filled with (`Prompts.messages`, `Prompts.instruction`); system prompts are sent as written.
ALLOWED_FIELDS = {"definition": ("domain", "question_type", "concept"),
                  "problem": ("domain", "question_type", "concept", "topic", "reference"),
                  "check": ("domain", "question_type", "concept", "problem", "solution"),
                  "instructions": ("domain", "question_type")}
_BRACED = re.compile(r"\{([A-Za-z][\w \-]{0,40})\}")  # what could be meant as a field: {concpet}, {question type}
CORE_FIELDS = ("model", "messages", "temperature", "max_completion_tokens", "seed")  # set by the run
_FIELD = re.compile(r"\{(" + "|".join(_FIELDS) + r")\}")



def fill(template: str, **fields: str) -> str:
    """Replace the known {field}s only, so that code and LaTeX braces in a prompt stay as written."""
    return _FIELD.sub(lambda match: fields.get(match.group(1), match.group(0)), template)


@dataclass(frozen=True)
class Prompts:
    """Everything the prompts file holds, as plain data (recorded whole in the run's run.json)."""

    data: dict

    def messages(self, stage: str, domain: Domain, **fields: str) -> list[dict[str, str]]:
        """The chat messages of one request: the stage's system prompt and its coding or other user prompt."""
        form = "coding" if domain.coding else "other"
        text = fill(self.data[stage][form], domain=domain.name, question_type=domain.question_type, **fields)
        return [{"role": "system", "content": self.data[stage]["system"]}, {"role": "user", "content": text}]

    def topics(self, domain: Domain) -> tuple[str, ...]:
        return domain.topics or tuple(self.data["topics"]["coding" if domain.coding else "other"])

    def references(self, domain: Domain) -> tuple[str, ...]:
        return domain.references or tuple(self.data["references"]["coding" if domain.coding else "other"])

    def request_fields(self, stage: str) -> dict:
        """The extra request-body fields of a stage (e.g. vLLM's structured_outputs)."""
        return dict(self.data["request"][stage] or {})

    def instruction(self, kind: str, domain: Domain) -> str:
        return fill(self.data["instructions"][kind], domain=domain.name, question_type=domain.question_type).strip()


def _default_data() -> dict:
    import yaml

    return yaml.safe_load(resources.files(__package__).joinpath("prompts.yaml").read_text(encoding="utf-8"))


def _check_fields(text: str, allowed: tuple[str, ...], where: str, source: str) -> None:
    """Refuse a {name} that would reach the model as written: a field not filled in at `where` (another stage's)
    or a misspelt one ({concpet}, {Concept}, {question type}). Other braces ({x}, \\begin{align}) are code or LaTeX."""
    for match in _BRACED.finditer(text):
        name = match.group(1)
        if name in allowed:
            continue
        key = re.sub(r"[\s\-]+", "_", name.strip().lower())
        near = [f for f in _FIELDS if key in (f, f + "s")] or difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.75)
        if not near:
            continue
        problem = (f"{{{name}}} is not filled in there" if name in _FIELDS else
                   f"{{{name}}} is not a field (did you mean {{{near[0]}}}?)")
        fields = ", ".join("{" + f + "}" for f in allowed) or "none (it is sent as written)"
        raise PromptsError(f"{source}: {where}: {problem}; it would reach the model as written. The fields of "
                           f"{where}: {fields}")


def _check(data: dict, source: str) -> None:
    for stage in STAGES:
        for form in ("system", "coding", "other"):
            value = data[stage].get(form)
            if not isinstance(value, str) or not value.strip():
                raise PromptsError(f"{source}: {stage}.{form} must be a non-empty text")
        for form in ("system", "coding", "other"):  # a misspelt field first: it says why a required one is missing
            _check_fields(data[stage][form], ALLOWED_FIELDS[stage] if form != "system" else (), f"{stage}.{form}",
                          source)
        for form in ("coding", "other"):
            missing = [f for f in _REQUIRED[stage] if "{" + f + "}" not in data[stage][form]]
            if missing:
                raise PromptsError(f"{source}: {stage}.{form} must contain {', '.join('{' + f + '}' for f in missing)}")
    for group in ("topics", "references"):
        for form in ("coding", "other"):
            items = data[group].get(form)
            if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
                raise PromptsError(f"{source}: {group}.{form} must be a non-empty list of texts")
            for item in items:  # put into a problem prompt as they are
                _check_fields(item, (), f"{group}.{form}", source)
    for kind in ROW_KINDS:
        if not isinstance(data["instructions"].get(kind), str) or not data["instructions"][kind].strip():
            raise PromptsError(f"{source}: instructions.{kind} must be a non-empty text")
        _check_fields(data["instructions"][kind], ALLOWED_FIELDS["instructions"], f"instructions.{kind}", source)
    for stage in STAGES:
        fields = data["request"].get(stage)
        if fields is not None and not isinstance(fields, dict):
            raise PromptsError(f"{source}: request.{stage} must be a mapping of extra request fields")
        taken = sorted(set(fields or {}) & set(CORE_FIELDS))
        if taken:
            raise PromptsError(f"{source}: request.{stage} cannot set {', '.join(taken)}: the run sets them "
                               "(--model, --temperature, --max-tokens, --seed)")


def load_prompts(path: str | Path | None = None) -> Prompts:
    """The default prompts, with the keys of `path` (a .yaml / .json file like prompts.yaml) put over them."""
    data = _default_data()
    if path is None:
        return Prompts(data)
    path = Path(path)
    try:
        override = read_structured_file(path, "prompts")
    except StructuredFileError as err:
        raise PromptsError(str(err)) from None
    if not isinstance(override, dict):
        raise PromptsError(f"{path}: expected a mapping like the default prompts.yaml")
    for section, value in override.items():
        if section not in data:
            raise PromptsError(f"{path}: unknown key {section!r}; known: {', '.join(data)}")
        if not isinstance(value, dict):
            raise PromptsError(f"{path}: {section} must be a mapping")
        unknown = set(value) - set(data[section])
        if unknown:
            raise PromptsError(f"{path}: unknown key(s) {sorted(unknown)} under {section}; known: "
                               f"{', '.join(data[section])}")
        data[section] = {**data[section], **value}
    _check(data, str(path))
    return Prompts(data)
