"""The records jobs leave beside their output, each a dataclass that owns its JSON (`to_dict` / `from_dict`) and
its file name: the training record and the conversion record of a model folder, and the corpus manifest.

They live here, below every job, because each is read by more than the job that writes it: the model card
(`model_card`) reads the training and conversion records that `train` and `convert` write, and `compact` reads
the calibration ranges in the manifest `corpus` writes. The evaluation wing's records (`summary.json`,
`run.json`) are read only by that wing and live there (`evaluation.summary`, `evaluation.run`).

`to_dict` gives the keys in the order the jobs have always written them, so a record written, read and written
again is the same bytes. `from_dict` refuses a record that is not a JSON object or holds a value of the wrong
type (`ModelFilesError` naming the file); keys it does not know (a later release's) are ignored, and keys it
lacks take their defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .model_folder import CONVERSION_RECORD, TRAINING_RECORD, read_json
from .errors import DiffembedError, ModelFilesError

_NUMBER = (int, float)
_NONE = type(None)


def _fields(cls, values: Any, source: str | Path, types: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """The known fields of `values` (a JSON object), each checked against its accepted types."""
    if not isinstance(values, dict):
        raise ModelFilesError(f"{source}: not a {cls.__name__} (expected a JSON object, got {type(values).__name__})")
    found = {}
    for name, accepted in types.items():
        if name in values:
            value = values[name]
            if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
                names = " or ".join("null" if t is _NONE else t.__name__ for t in accepted)
                raise ModelFilesError(f"{source}: {name!r} must be {names}, got {value!r:.80}")
            found[name] = value
    return found


def _read(cls, folder: str | Path, error: type[DiffembedError]):
    """`cls` read from `folder / cls.FILE`; None when the folder has none (or an empty object)."""
    path = Path(folder) / cls.FILE
    if not path.is_file():
        return None
    values = read_json(path, error)
    return cls.from_dict(values, source=path) if values != {} else None


# ----------------------------------------------------------------------------------------------------------
# diffembed_training.json: what `diffembed train` ran
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What ran, not what was asked for: steps, epochs over the rows, samples seen, first and last logged loss."""

    steps: int = 0
    epochs: float | None = None
    samples: int = 0
    devices: int = 1
    first_loss: float | None = None
    final_loss: float | None = None
    losses: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "learning_rate"} per logged step
    peak_learning_rate: float | None = None
    warmup_steps: float | None = None  # as the trainer's arguments hold it
    device_settings: dict[str, Any] | None = None
    resumed_from_step: int | None = None

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "steps": (int,), "epochs": (*_NUMBER, _NONE), "samples": (int,), "devices": (int,),
        "first_loss": (*_NUMBER, _NONE), "final_loss": (*_NUMBER, _NONE), "losses": (list,),
        "peak_learning_rate": (*_NUMBER, _NONE), "warmup_steps": (*_NUMBER, _NONE), "device_settings": (dict, _NONE),
        "resumed_from_step": (int, _NONE),
    }

    @classmethod
    def from_dict(cls, values: Any, source: str | Path) -> TrainingRun:
        return cls(**_fields(cls, values, f"{source} (training)", cls.TYPES))


@dataclass
class HeldoutEvaluation:
    """The held-out split's retrieval metrics after training (and before, when measured)."""

    split: str = "the held-out split"
    max_seq_length: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_before_training: dict[str, float] | None = None

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "split": (str,), "max_seq_length": (int, _NONE), "metrics": (dict,), "metrics_before_training": (dict, _NONE),
    }

    @classmethod
    def from_dict(cls, values: Any, source: str | Path) -> HeldoutEvaluation:
        return cls(**_fields(cls, values, f"{source} (evaluation)", cls.TYPES))


@dataclass
class TrainingRecord:
    """`diffembed_training.json`, written by `diffembed train` into the model (or adapter) folder."""

    FILE: ClassVar[str] = TRAINING_RECORD  # "diffembed_training.json"

    base_model: str | None = None  # the base's absolute path or Hub id, as the adapter names it
    base_model_revision: str | None = None
    datasets: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the TrainingConfig, every field
    training: TrainingRun | None = None
    evaluation: HeldoutEvaluation | None = None
    training_time_seconds: float | None = None

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "base_model": (str, _NONE), "base_model_revision": (str, _NONE), "datasets": (list,),
        "hyperparameters": (dict,), "training": (dict, _NONE), "evaluation": (dict, _NONE),
        "training_time_seconds": (*_NUMBER, _NONE),
    }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, source: str | Path = FILE) -> TrainingRecord:
        found = _fields(cls, values, source, cls.TYPES)
        if not all(isinstance(name, str) for name in found.get("datasets", [])):
            raise ModelFilesError(f"{source}: 'datasets' must be a list of names")
        if found.get("training") is not None:
            found["training"] = TrainingRun.from_dict(found["training"], source)
        if found.get("evaluation") is not None:
            found["evaluation"] = HeldoutEvaluation.from_dict(found["evaluation"], source)
        return cls(**found)

    @classmethod
    def read(cls, folder: str | Path, error: type[DiffembedError] = ModelFilesError) -> TrainingRecord | None:
        """The record in `folder`, or None (not trained with `diffembed train`); `error` for unreadable JSON."""
        return _read(cls, folder, error)


# ----------------------------------------------------------------------------------------------------------
# diffembed_conversion.json: where `diffembed convert` took the weights from
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GgufSource:
    """A GGUF source file's quantization (`convert.gguf.GGUFInfo.record`): its dequantized weights carry it."""

    file: str | None = None
    architecture: str | None = None
    quantization: str | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)  # tensor type -> how many tensors have it
    dequantized_to: str | None = None
    name: str | None = None
    license: str | None = None

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "file": (str, _NONE), "architecture": (str, _NONE), "quantization": (str, _NONE), "tensor_types": (dict,),
        "dequantized_to": (str, _NONE), "name": (str, _NONE), "license": (str, _NONE),
    }

    @classmethod
    def from_dict(cls, values: Any, source: str | Path) -> GgufSource:
        return cls(**_fields(cls, values, f"{source} (gguf)", cls.TYPES))


@dataclass
class ConversionRecord:
    """`diffembed_conversion.json`, written by `diffembed convert` into the folder it makes."""

    FILE: ClassVar[str] = CONVERSION_RECORD  # "diffembed_conversion.json"

    source: str | None = None  # the Hub id, or the source as the user named it
    hub_id: str | None = None
    family: str | None = None
    family_title: str | None = None
    diffusion: bool = False
    dtype: str | None = None
    command: str = "diffembed convert"  # the command that made the folder, with its options
    sliding_window: int | None = None  # the source's sliding window, ignored (--ignore-sliding-window)
    version: str | None = None  # of diffembed-hf
    gguf: GgufSource | None = None  # written only for a GGUF source

    TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "source": (str, _NONE), "hub_id": (str, _NONE), "family": (str, _NONE), "family_title": (str, _NONE),
        "diffusion": (bool,), "dtype": (str, _NONE), "command": (str,), "sliding_window": (int, _NONE),
        "version": (str, _NONE), "gguf": (dict, _NONE),
    }

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if self.gguf is None:
            del values["gguf"]
        return values

    @classmethod
    def from_dict(cls, values: Any, source: str | Path = FILE) -> ConversionRecord:
        found = _fields(cls, values, source, cls.TYPES)
        if found.get("gguf") is not None:
            found["gguf"] = GgufSource.from_dict(found["gguf"], source)
        return cls(**found)

    @classmethod
    def read(cls, folder: str | Path, error: type[DiffembedError] = ModelFilesError) -> ConversionRecord | None:
        """The record in `folder`, or None (not made by `diffembed convert`); `error` for unreadable JSON."""
        return _read(cls, folder, error)


# ----------------------------------------------------------------------------------------------------------
# .diffembed-manifest.json: a corpus folder's settings and shards (`corpus.shards`)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CorpusManifest:
    """The manifest of a corpus output folder. A run writes it when it starts (`complete` false: the settings,
    the vectors' description and the shard digests an earlier run of the same settings recorded) and again at
    its end (`complete` true, with the summary fields and every shard's row count and sha256).

    `vectors` holds what a reader of the vectors needs besides the type (`corpus.encode.CorpusJob.
    manifest_fields`: precision, truncate_dim, bytes per vector, calibration ranges) and `created_by`."""

    FILE: ClassVar[str] = ".diffembed-manifest.json"  # hidden: parquet readers pointed at the folder skip it
    FORMAT: ClassVar[str] = "diffembed-corpus-embeddings/1"
    SUMMARY: ClassVar[tuple[str, ...]] = ("model", "revision", "dim", "prompt", "normalized", "max_seq_length", "dtype")

    settings: dict[str, Any] | None
    complete: bool = False
    summary: dict[str, Any] = field(default_factory=dict)  # complete: the SUMMARY settings, for readers
    rows: int | None = None
    skipped_rows: int | None = None
    skipped_examples: list[str] | None = None
    shards: list[dict[str, Any]] | None = None  # {"file", "rows", "sha256"} (opening: {"file", "sha256"})
    vectors: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"format": self.FORMAT, "complete": self.complete}
        if self.complete:
            values.update(self.summary)
            values.update({"rows": self.rows, "skipped_rows": self.skipped_rows,
                           "skipped_examples": self.skipped_examples, "shards": self.shards})
            return {**values, **self.vectors, "settings": self.settings}
        values = {**values, **self.vectors, "settings": self.settings}
        return {**values, "shards": self.shards} if self.shards else values

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The int8/uint8 calibration ranges (`compact.CalibrationRanges.to_dict`), or None."""
        return self.vectors.get("calibration")

    @classmethod
    def from_dict(cls, values: Any, source: str | Path = FILE) -> CorpusManifest:
        """The manifest in `values`; not one of ours (another format) is a ModelFilesError naming `source`."""
        if not isinstance(values, dict) or values.get("format") != cls.FORMAT:
            raise ModelFilesError(f"{source} is not a diffembed corpus manifest (format {cls.FORMAT})")
        found = _fields(cls, values, source, {
            "settings": (dict, _NONE), "complete": (bool,), "rows": (int, _NONE), "skipped_rows": (int, _NONE),
            "skipped_examples": (list, _NONE), "shards": (list, _NONE)})
        known = {"format", "settings", "complete", "rows", "skipped_rows", "skipped_examples", "shards"}
        complete = found.get("complete", False)
        summary = {k: values[k] for k in cls.SUMMARY if k in values} if complete else {}
        vectors = {k: v for k, v in values.items() if k not in known and k not in summary}
        return cls(found.get("settings"), complete, summary, found.get("rows"), found.get("skipped_rows"),
                   found.get("skipped_examples"), found.get("shards"), vectors)
