"""Contrastive training data: (query, positive, negatives...) rows from jsonl / csv / parquet files or the Hub.

Rows become sentence-transformers' (anchor, positive, negative_1, ...) columns, with the row's instruction
(or the default query prompt) in front of the query and nothing in front of documents, as in the study.
Every problem is reported with the file and the 1-based row, before anything is written anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from .model_folder import is_hub_id
from .errors import DataError, DataSourceError
from .sentence_transformer import DEFAULT_QUERY_PROMPT, instruction_prompt


_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Column names recognised without a mapping. ReasonAug (siyue/ReasonAug): user_query, positive_document,
# hard_negative_document, task. E5 / sentence-transformers style: query|anchor, positive|pos, negative(s)|neg.
QUERY_COLUMNS = ("user_query", "query", "anchor", "question")
POSITIVE_COLUMNS = ("positive_document", "positive", "pos", "document")
NEGATIVE_COLUMNS = ("hard_negative_document", "negative", "negatives", "neg", "hard_negative", "hard_negatives")
INSTRUCTION_COLUMNS = ("task", "instruction", "prompt")


def check_data_source(source: str) -> None:
    """Before any work: a local data file exists with a known type; anything else must be able to be a Hub id
    (a missing local file is named as missing, never as an unreachable Hub dataset)."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataSourceError(f"{source} is a folder; give a {' / '.join(_FILE_FORMATS)} file or a Hub dataset id")
    if path.exists():
        if path.suffix.lower() not in _FILE_FORMATS:
            raise DataSourceError(f"{source}: unsupported file type {path.suffix or '(none)'}; use "
                                  f"{', '.join(_FILE_FORMATS)}")
        return
    if not is_hub_id(source):
        raise DataSourceError(f"{source}: no such file" + ("" if path.suffix else
                              " (and not a Hub dataset id of the form namespace/name)"))


def _describe(value) -> str:
    """What a cell holds, for an error message: "empty" only for an empty or blank text."""
    if value is None:
        return "empty (null)"
    if isinstance(value, str):
        return "empty"
    return f"not text but a {type(value).__name__} ({value!r:.40})"


@dataclass
class ColumnMapping:
    """Which source columns hold the query, the positive, the negatives and the per-row instruction.
    A negatives column may hold one text or a list of texts."""

    query: str | None = None
    positive: str | None = None
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None


def format_query(query: str, instruction: str | None, default_prompt: str = DEFAULT_QUERY_PROMPT) -> str:
    """The row's instruction as a prompt (`instruction_prompt`, the one rule) + query; the default prompt where
    the row has no instruction."""
    if instruction is None or not instruction.strip():
        return default_prompt + query
    return instruction_prompt(instruction) + query


def load_rows(source: str) -> Dataset:
    """Read a local file by its extension, or a Hub dataset id (its train split)."""
    path = Path(source).expanduser()
    check_data_source(source)
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"{source}: the file is empty")
        suffix = path.suffix.lower()
        try:
            dataset = load_dataset(_FILE_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises its own types for a malformed file
            cause = err.__cause__ or err
            raise DataError(f"{source}: cannot be read as {suffix} ({type(cause).__name__}: {cause})") from err
    else:
        dataset = load_dataset(source, split="train")
    if len(dataset) == 0:
        raise DataError(f"{source}: no rows")
    return dataset


def resolve_columns(dataset: Dataset, source: str, mapping: ColumnMapping | None = None) -> ColumnMapping:
    """Fill the mapping's gaps from known column names; an explicit name must exist."""
    mapping = mapping or ColumnMapping()
    columns = dataset.column_names

    def pick(explicit, candidates, role, required=True):
        if explicit is not None:
            if explicit not in columns:
                raise DataError(f"{source}: no column {explicit!r} for the {role}; columns are {columns}")
            return explicit
        found = next((c for c in candidates if c in columns), None)
        if found is None and required:
            raise DataError(
                f"{source}: no {role} column (looked for {list(candidates)}); columns are {columns}. "
                f"Name it with --{role}-column."
            )
        return found

    negatives = [pick(n, (), "negative") for n in mapping.negatives]
    if not negatives:
        negatives = [c for c in NEGATIVE_COLUMNS if c in columns]
        # negative_1, negative_2, ... (not ReasonAug's `negative_instance`, the name of the negative's concept)
        numbered = [c for c in columns if re.fullmatch(r"negative_\d+", c)]
        negatives += sorted(numbered, key=lambda c: int(c.split("_")[1]))
    return ColumnMapping(
        query=pick(mapping.query, QUERY_COLUMNS, "query"),
        positive=pick(mapping.positive, POSITIVE_COLUMNS, "positive"),
        negatives=negatives,
        instruction=pick(mapping.instruction, INSTRUCTION_COLUMNS, "instruction", required=False),
    )


def to_training_rows(
    dataset: Dataset, source: str, mapping: ColumnMapping, default_prompt: str = DEFAULT_QUERY_PROMPT
) -> tuple[dict[str, list[str]], list[str | None]]:
    """Validate every row and build the (anchor, positive, negative_1..k) columns plus each row's instruction."""
    rows: dict[str, list[str]] = {"anchor": [], "positive": []}
    instructions: list[str | None] = []
    expected_negatives = None
    for number, record in enumerate(dataset, 1):
        query, positive = record[mapping.query], record[mapping.positive]
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{source} row {number}: the query in column {mapping.query!r} is {_describe(query)}")
        if not isinstance(positive, str) or not positive.strip():
            raise DataError(f"{source} row {number}: the positive in column {mapping.positive!r} is "
                            f"{_describe(positive)}")
        negatives = []
        for column in mapping.negatives:
            value = record[column]
            negatives.extend(value if isinstance(value, list) else [] if value is None else [value])
        for negative in negatives:
            if not isinstance(negative, str) or not negative.strip():
                raise DataError(f"{source} row {number}: a negative in {mapping.negatives} is {_describe(negative)}")
        if expected_negatives is None:
            expected_negatives = len(negatives)
            for k in range(1, expected_negatives + 1):
                rows[f"negative_{k}"] = []
        elif len(negatives) != expected_negatives:
            raise DataError(
                f"{source} row {number}: {len(negatives)} negatives, but row 1 has {expected_negatives}; "
                "every row needs the same number"
            )
        instruction = record[mapping.instruction] if mapping.instruction else None
        rows["anchor"].append(format_query(query, instruction, default_prompt))
        rows["positive"].append(positive)
        for k, negative in enumerate(negatives, 1):
            rows[f"negative_{k}"].append(negative)
        instructions.append(instruction)
    return rows, instructions


@dataclass
class TrainingData:
    """Validated rows, split into training and held-out parts."""

    train: Dataset | DatasetDict
    eval: Dataset | None
    source: str
    mapping: ColumnMapping
    instructions: list[str] = field(default_factory=list)  # the distinct instructions of the rows ("" for none)
    negatives_per_row: int = 0


def load_training_data(
    source: str,
    *,
    mapping: ColumnMapping | None = None,
    eval_source: str | None = None,
    eval_fraction: float = 0.0,
    group_by_instruction: bool = False,
    default_prompt: str = DEFAULT_QUERY_PROMPT,
    seed: int = 42,
) -> TrainingData:
    """Load, validate and split. `group_by_instruction` returns one dataset per instruction so that every batch
    holds rows of a single instruction (the study's batching); it needs an instruction column."""
    raw = load_rows(source)
    mapping = resolve_columns(raw, source, mapping)
    rows, instructions = to_training_rows(raw, source, mapping, default_prompt)
    dataset = Dataset.from_dict(rows)
    dataset = dataset.add_column("_instruction", [i or "" for i in instructions])
    held_out = None
    if eval_source is not None:
        eval_raw = load_rows(eval_source)
        eval_rows, _ = to_training_rows(eval_raw, eval_source, resolve_columns(eval_raw, eval_source, mapping),
                                        default_prompt)
        held_out = Dataset.from_dict(eval_rows)
    elif eval_fraction > 0:
        if not 0 < eval_fraction < 1 or int(len(dataset) * eval_fraction) < 1:
            raise DataError(f"{source}: eval_fraction={eval_fraction} leaves no held-out row out of {len(dataset)}")
        split = dataset.train_test_split(test_size=eval_fraction, seed=seed)
        dataset, held_out = split["train"], split["test"].remove_columns("_instruction")
    if group_by_instruction:
        if mapping.instruction is None:
            raise DataError(f"{source}: group_by_instruction needs an instruction column")
        groups = sorted(set(dataset["_instruction"]))
        train = DatasetDict(
            {f"group_{i}": dataset.filter(lambda r, g=g: r["_instruction"] == g).remove_columns("_instruction")
             for i, g in enumerate(groups)}
        )
    else:
        train = dataset.remove_columns("_instruction")
    return TrainingData(train=train, eval=held_out, source=source, mapping=mapping,
                        instructions=sorted({(i or "").strip() for i in instructions}), negatives_per_row=len(rows) - 2)
