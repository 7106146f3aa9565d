"""The contracts every job's options share, written once: each check names the parameter at fault and raises
`errors.OptionError` (a `UsageError` and a `ValueError`), which the CLI shows under the flag that sets it.

`MAX_SEQ_LENGTH` is the study's training and evaluation length (4096 tokens): the recipe's length on a GPU, the
cap of a converted model's stored length, the default of a saved sentence-transformers folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, TypeVar

from .errors import OptionError

MAX_SEQ_LENGTH = 4096


def _is_int(value: Any) -> bool:
    """A whole number that is not a bool (`True` is an int to Python, never a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    """A count a file may store (a stored length, a dimension): an integer >= 1 that is not a bool."""
    return _is_int(value) and value >= 1


def is_non_negative_int(value: Any) -> bool:
    """A count that may be zero (tokens, indices) as a file stores it: an integer >= 0 that is not a bool."""
    return _is_int(value) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """An integer >= 1 (steps, sizes, lengths, counts); None passes where `optional` (an automatic value)."""
    if value is None and optional:
        return
    if not is_positive_int(value):
        raise OptionError(name, f"must be an integer >= 1, got {value!r}")


def check_non_negative_int(name: str, value: Any, *, optional: bool = False) -> None:
    """An integer >= 0 (warm-up steps, retries)."""
    if value is None and optional:
        return
    if not is_non_negative_int(value):
        raise OptionError(name, f"must be an integer >= 0, got {value!r}")


def check_positive_float(name: str, value: Any, *, optional: bool = False) -> None:
    """A finite number > 0 (learning rates, scales, timeouts)."""
    if value is None and optional:
        return
    if not _is_number(value) or not 0 < value < math.inf:
        raise OptionError(name, f"must be a number > 0, got {value!r}")


def check_fraction(name: str, value: Any, *, optional: bool = False) -> None:
    """A number in [0, 1) (a share of the rows)."""
    if value is None and optional:
        return
    if not _is_number(value) or not 0 <= value < 1:
        raise OptionError(name, f"must be a number in [0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices, *, optional: bool = False) -> None:
    """One of `choices`."""
    if value is None and optional:
        return
    if value not in choices:
        raise OptionError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_max_seq_length(value: Any, limit: int | None = None, name: str = "max_seq_length") -> None:
    """THE check of a requested length, for every entry point: None (the model's own), or an integer >= 1 that
    fits the model's positions (`limit`, its max_position_embeddings, where known)."""
    check_positive_int(name, value, optional=True)
    if value is not None and limit and value > limit:
        raise OptionError(name, f"{value} exceeds the model's max_position_embeddings ({limit}); pass {limit} or less")


Options = TypeVar("Options")


def read_options(cls: type[Options], path: str | Path, what: str, **overrides) -> Options:
    """An options dataclass from a JSON file of its field values, `overrides` winning; an unknown key is an error
    naming the known ones, never silently ignored."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise OptionError("config", f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise OptionError("config", f"{path}: not a JSON file ({err})") from None
    if not isinstance(values, dict):
        raise OptionError("config", f"{path}: expected a JSON object of {what} settings")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError("config", f"{path}: unknown {what} settings {unknown}; known: {sorted(known)}")
    return cls(**{**values, **overrides})


def with_overrides(cls: type[Options], options: Options | None, overrides: dict) -> Options:
    """`options` (default: the defaults) with the keyword `overrides` a caller gave beside it; an unknown keyword
    is a TypeError, as for any function."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"{cls.__name__} has {', '.join(sorted(known))}")
    if options is None:
        return cls(**overrides)
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options
