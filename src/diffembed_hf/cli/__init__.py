"""`diffembed` command line: a thin layer over the library functions, one module per command.

Each command module (`demo`, `train`, `encode`, `evaluate`, `convert`, `export`, `push`, `reasonaug`) has
`add_parser`, which registers the command and its options next to its handler, and `run(args)`, which calls the
library; the library makes the decisions (which mode, which options apply) and raises `errors.UsageError` (exit
status 2) or `errors.DiffembedError` (exit status 1), which `main` prints as one line, `diffembed <cmd>: error: ...`
(`--debug` adds the traceback). Commands import what they need when they run, so `diffembed --help` imports
neither torch nor transformers.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

from .. import __version__
from ..errors import DiffembedError, one_line
from . import convert, demo, encode, evaluate, export, push, reasonaug, train
from .common import ArgumentParser, add_output_options, byte_size, error_message, fraction, positive_float, positive_int

COMMANDS = (demo, train, encode, evaluate, convert, export, push, reasonaug)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="diffembed", description="Diffusion language models as text embedders.")
    parser.add_argument("--version", action="version", version=f"diffembed-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    for name, sub in commands.choices.items():  # every command, including ones added above later, gets these
        if name != "export":  # its engine parser reads the rest of the line and has them
            add_output_options(sub)
    parser.set_defaults(verbose=False, debug=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the libraries too (INFO)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser


class _LogFilter(logging.Filter):
    """This package's INFO messages (what a job is doing) and every library's warnings; libraries' INFO only
    with --verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.WARNING or record.name.startswith("diffembed_hf")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each message (a caller may have replaced it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_output(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    handler.addFilter(_LogFilter(verbose))
    handler._diffembed_cli = True
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_diffembed_cli", False)]:  # main() called again
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not verbose:
        _quiet_library_progress_bars()
        # torchao (the [fp8] extra), which PEFT and transformers import whenever it is installed, logs at import
        # that kernels its CPU build lacks failed to load and that torch deprecated a registration it makes:
        # nothing a user can act on.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # transformers 5 renamed gradient checkpointing to activation checkpointing; sentence-transformers and
        # PEFT still call the old names, which we cannot change. The rest of our code uses the new names.
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*only defines `gradient_checkpointing_enable`",
                                category=FutureWarning)


def _quiet_library_progress_bars() -> None:
    """The libraries' own progress bars (transformers' "Loading weights" and "Writing model shards", datasets'
    "Generating train split") only with -v; the job's bars (embedding, training steps) and the downloads' stay.

    Set before transformers or datasets is imported (the commands import them when they run): transformers
    decides once, at import, from huggingface_hub's global switch, which is turned off here and then on again for
    huggingface_hub's own groups (the download bars); datasets reads its environment variable."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" not in sys.modules:
        disable_progress_bars()
        enable_progress_bars("huggingface_hub")


def _other_rank() -> str:
    """" (rank K of N)" on a torchrun rank other than 0, so that a line from it says where it comes from; "" in
    one process, on rank 0, and where the variables do not describe a torchrun job (the job refuses those)."""
    env = os.environ
    rank, world = env.get("RANK", ""), env.get("WORLD_SIZE", "")
    launched = all(env.get(name) for name in ("MASTER_ADDR", "MASTER_PORT"))
    if launched and rank.isdigit() and world.isdigit() and 0 < int(rank) < int(world):
        return f" (rank {rank} of {world})"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_output(args.verbose)
    command = " ".join(["diffembed", args.command] + ([args.engine] if getattr(args, "engine", None) else []))
    command += _other_rank()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except DiffembedError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{command}: error: {error_message(err)}", file=sys.stderr)
        return err.exit_status
    except Exception as err:  # noqa: BLE001 - a failure we did not foresee: still one line, traceback on request
        if args.debug:
            traceback.print_exc()
        # the file system refusing (a full disk, a denied permission) is no bug: the file and the reason suffice
        foreseen = args.debug or isinstance(err, OSError) and bool(err.strerror)
        print(f"{command}: error: {one_line(err)}" + ("" if foreseen else
              " (run again with --debug for the traceback)"), file=sys.stderr)
        return 1


__all__ = ["build_parser", "byte_size", "fraction", "main", "positive_float", "positive_int"]
