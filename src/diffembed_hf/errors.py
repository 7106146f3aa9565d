"""Every error a user can cause, in one hierarchy, so that the CLI turns each into a one-line message.

`DiffembedError` is a job that cannot be done as asked (exit status 1); `UsageError` is a command line or
argument that is wrong before any work starts (exit status 2, as argparse uses). Each job has its own subclass,
which also derives from the built-in type a Python caller expects (`ValueError`, `FileExistsError`, ...), so
library users can catch either. Missing optional dependencies go through `require_extra`, which names the
pip command.
"""

from __future__ import annotations

import importlib.util


class DiffembedError(Exception):
    """A job that cannot be done as asked; the message says why and names the file, row or option."""

    exit_status = 1

    def __init__(self, *args, exit_status: int | None = None):
        super().__init__(*args)
        if exit_status is not None:  # e.g. a job error class whose one case is a usage error
            self.exit_status = exit_status


class UsageError(DiffembedError):
    """A wrong option, argument or output location, found before any work starts."""

    exit_status = 2


class OptionError(UsageError, ValueError):
    """An option (a parameter of a library call, a field of an options object) out of its range. `option` is
    the parameter's name, `problem` what is wrong with its value; the CLI names the flag that sets it instead.
    Other options the problem mentions are written `{name}` in it and listed in `others`: the message names each
    by its parameter, the CLI by its flag."""

    def __init__(self, option: str, problem: str, others: tuple[str, ...] = ()):
        self.option, self.problem, self.others = option, problem, others
        super().__init__(self.worded(lambda name: name))

    def worded(self, name_of) -> str:
        """The message with every option named by `name_of(parameter)`."""
        problem = self.problem
        for other in self.others:
            problem = problem.replace("{" + other + "}", name_of(other))
        return f"{name_of(self.option)} {problem}"


class OutputExistsError(UsageError, FileExistsError):
    """The output would replace something the user has; they must pass --overwrite (overwrite=True)."""


class OutputAppearedError(OutputExistsError):
    """The output appeared while the job ran (another process made it), so the finished work was not kept: a
    failed job (exit status 1), not a wrong option."""

    exit_status = 1


class OutputLockedError(UsageError):
    """Another run is writing the same output right now; the message names it (pid and host)."""


class MissingExtraError(DiffembedError, ImportError):
    """An optional dependency group is not installed; the message names the pip command."""


class UntrustedFolderError(UsageError, ValueError):
    """A model folder whose contents would make a command read or write outside it, or run its own code
    without the user's opt-in (--trust-remote-code)."""


class ModelFilesError(DiffembedError, ValueError):
    """A file a model folder needs is missing or damaged (a JSON file that does not parse, weights cut short, no
    tokenizer); the message names the file."""


class PromptNameError(UsageError, ValueError):
    """A prompt name the model does not store."""


class QuantizationUnavailable(DiffembedError, RuntimeError):
    """The requested quantization cannot run on this machine or with these packages; the message says why."""


class ConversionError(DiffembedError, ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or tensor at fault."""


class ConversionUsageError(ConversionError, UsageError):
    """A conversion asked wrongly (a missing source, an output that exists), found before any work."""


class CorpusError(UsageError, ValueError):
    """A problem with the user's corpus or output folder, described in words (no traceback needed)."""


class EvaluationError(UsageError, ValueError):
    """A user-fixable evaluation problem (a bad name, a bad data folder, a dataset out of reach)."""


class ExportError(UsageError, ValueError):
    """A folder cannot be exported as asked; the message names the file or setting at fault."""


class PublishError(DiffembedError):
    """A folder that cannot be pushed, a failed validation, or a failed upload (exit status 1)."""


class PublishUsageError(PublishError, UsageError):
    """A wrong repo id, token, option or path, found before any work (exit status 2)."""


class DataError(DiffembedError, ValueError):
    """A training file that cannot be used as it is; the message names the file and row."""


class DataSourceError(DataError, UsageError):
    """A training data source that cannot be one (a folder, an unknown file type, a missing file), found before
    any work."""


class ConfigError(UsageError, ValueError):
    """A training setting out of its range, or a settings file that cannot be used."""


class SettingError(ConfigError, OptionError):
    """A training setting (a TrainingConfig field) out of its range: named by its field, by the CLI by its flag."""


class MemoryLimitError(ConfigError, MemoryError):
    """Settings whose estimated peak memory (`memory_estimate`) exceeds the device's, refused before loading; the
    message names the settings that would fit."""


class TrainingError(DiffembedError, RuntimeError):
    """Training could not run as asked (no batch to train on, ...); nothing was written."""


class NonFiniteLossError(DiffembedError, FloatingPointError):
    """The loss or an embedding became NaN/inf; no model was written."""


class JournalError(DiffembedError):
    """A ReasonAug journal that cannot be read (not a torn last line, which is expected after a kill)."""


class ServerError(DiffembedError):
    """The server cannot answer this run: unreachable after every retry, or it refuses the requests (4xx)."""


class BatchError(DiffembedError, ValueError):
    """A batch output file that cannot be read; the message names the file and line."""


class PromptsError(UsageError, ValueError):
    """A prompts file that cannot be used; the message names the file and the key."""


class ConceptsError(UsageError, ValueError):
    """A concepts file that cannot be used; the message names the file and the domain or concept."""


class CompactError(UsageError, ValueError):
    """A truncation, precision or calibration that cannot be used as asked; the message says why."""


class CalibrationMismatch(CompactError):
    """Calibration ranges that belong to another model or another dimension."""


def one_line(error: BaseException) -> str:
    """What a user reads for `error`: our own errors' message; for a file system error (a full disk, a denied
    permission) the file and the reason; the type and message of anything else."""
    if isinstance(error, DiffembedError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return f"{type(error).__name__}: {error}"


# The optional extras of setup.cfg and the modules each one provides.
EXTRAS = {
    "train": ("peft", "datasets", "accelerate", "bm25s"),
    "eval": ("mteb",),
    "ray": ("ray",),
    "fp8": ("torchao",),
    "reasonaug": ("openai", "bm25s"),
    "gguf": ("gguf", "accelerate"),  # transformers loads GGUF files only with accelerate installed
    "demo": ("peft", "datasets", "accelerate", "bm25s", "gguf"),  # train + gguf: the demo converts a GGUF file
}


def require_extra(extra: str, modules: tuple[str, ...] | None = None, *, what: str = "this") -> None:
    """Raise MissingExtraError naming `pip install 'diffembed-hf[extra]'` unless every module is importable."""
    missing = [name for name in (modules or EXTRAS[extra]) if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs the optional dependencies of diffembed-hf[{extra}] ({', '.join(missing)} missing): "
            f"pip install 'diffembed-hf[{extra}]'"
        )
