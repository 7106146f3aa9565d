"""The errors a user can cause, one hierarchy, so that the CLI turns every one into a one-line message.

`DiffembedError` is a job that cannot be done as asked (exit status 1); `UsageError` is a command line or
argument that is wrong before any work starts (exit status 2, as argparse uses). Library functions raise them
(or subclasses that also derive from the built-in type a Python caller expects, e.g. `ValueError`).
"""

from __future__ import annotations

import importlib.util


class DiffembedError(Exception):
    """A job that cannot be done as asked; the message says why and names the file, row or option."""

    exit_status = 1

    def __init__(self, *args, exit_status: int | None = None):
        super().__init__(*args)
        if exit_status is not None:  # e.g. a library error class whose one case is a usage error
            self.exit_status = exit_status


class UsageError(DiffembedError):
    """A wrong option, argument or output location, found before any work starts."""

    exit_status = 2


class OutputExistsError(UsageError, FileExistsError):
    """The output would replace something the user has; they must pass --overwrite (overwrite=True)."""


class MissingExtraError(DiffembedError, ImportError):
    """An optional dependency group is not installed; the message names the pip command."""


# The optional extras of setup.cfg and the modules each one provides.
EXTRAS = {
    "train": ("peft", "datasets", "accelerate", "bm25s"),
    "eval": ("mteb",),
    "ray": ("ray",),
    "fp8": ("torchao",),
    "gguf": ("gguf", "accelerate"),  # transformers loads GGUF files only with accelerate installed
}


def require_extra(extra: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError naming `pip install 'diffembed-hf[extra]'` unless every module is importable."""
    missing = [name for name in (modules or EXTRAS[extra]) if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"this needs the optional dependencies of diffembed-hf[{extra}] ({', '.join(missing)} missing): "
            f"pip install 'diffembed-hf[{extra}]'"
        )


class ConversionError(DiffembedError, ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or tensor at fault."""
