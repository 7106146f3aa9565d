"""What every subcommand shares: argument types that refuse a bad value before any work (naming the option and
the accepted range, exit status 2), the help formatter that shows defaults, the `-v` / `--debug` options, and
the checks of a model source or device that need no model loaded."""

from __future__ import annotations

import argparse
import json

from ..errors import DiffembedError, OptionError, UsageError

# A library parameter -> the flag that sets it, where the flag is not the parameter's name with dashes.
FLAGS = {
    "stdlib_rows": "--max-heldout",
    "gradcache_mini_batch_size": "--gradcache",
    "show_progress_bar": "--progress",
    "lora": "--full",  # its opposite: lora=False is --full
    "gradient_checkpointing": "--[no-]gradient-checkpointing",
    "bf16": "--[no-]bf16",
}


# Training settings that only a --config file sets (TrainingConfig fields without a flag of their own).
CONFIG_ONLY = {"save_steps", "save_total_limit", "logging_steps", "seed", "lora_r", "lora_alpha", "lora_dropout",
               "scale", "query_prompt"}


def flag(option: str) -> str:
    """The command-line flag that sets the library parameter `option` (or says that a --config file does)."""
    if option in CONFIG_ONLY:
        return f"{option} (a --config setting)"
    return FLAGS.get(option) or "--" + option.replace("_", "-")


def error_message(error: DiffembedError) -> str:
    """What the CLI prints for a library error: an option out of range is named by its flag."""
    if isinstance(error, OptionError):
        return error.worded(flag)
    return str(error)


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch sizes, lengths, counts)."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps, ...)."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, scales)."""
    value = _number(text, float, "a number > 0")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (a share of the rows, e.g. held out for evaluation)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def byte_size(text: str) -> str:
    """A size in bytes, e.g. 5GB or 500MiB (> 0); kept as text for the library to read."""
    from ..outputs import parse_size

    try:
        parse_size(text)
    except DiffembedError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def memory_size(text: str) -> int:
    """A memory size in bytes, e.g. 80GiB, 24GB or 512MiB (> 0)."""
    from ..outputs import parse_size

    try:
        value = parse_size(text)
    except DiffembedError:
        raise argparse.ArgumentTypeError(f"must be a memory size > 0 such as 80GiB or 512MiB, got {text!r}") from None
    return value


def add_estimate_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--estimate (print the peak memory from config.json and exit) and --device-memory (what to compare it with)."""
    parser.add_argument("--estimate", action="store_true", help=f"print the peak memory {what} will need (weights, "
                        "activations, ...; from config.json, no weight loaded), whether it fits the device, and "
                        "exit")
    parser.add_argument("--device-memory", type=memory_size, metavar="SIZE", help="the memory to check the estimate "
                        "against, e.g. 80GiB (default: the device's free memory, or the host's available memory)")


def print_inference_estimate(args: argparse.Namespace, what: str) -> int:
    """`encode --estimate` / `evaluate --estimate`: the table for the token budget, from config.json alone."""
    from ..memory_estimate import ModelShape, device_memory, inference_estimate, read_model_config, resolve_device

    device = resolve_device(args.device)
    shape = ModelShape.from_config(read_model_config(args.model))
    quantized = getattr(args, "quantize", None) is not None
    estimate = inference_estimate(shape, max_tokens_per_batch=args.max_tokens_per_batch,
                                  max_seq_length=args.max_seq_length, device=device,
                                  dtype_bytes=2 if quantized else None, what=what)
    if quantized:
        estimate.notes.append("--quantize fp8: linear weights counted at bf16 (an upper bound)")
    estimate.notes.append("not counted: the vectors kept in memory (rows x dimension x 4 B), the libraries and data")
    memory, source = device_memory(device, args.device_memory)
    print(estimate.table(memory, source))
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default; options whose default depends on something else say so in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default not in (None, False)
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults shown; subcommand parsers are built from this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """-v and --debug, on every command that runs (the top-level parser has them too)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress of the libraries too (INFO)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")


def add_trust_option(parser: argparse.ArgumentParser, what: str = "the model folder") -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=f"allow Python code that {what} brings (tokenizer or model classes) to run; read it "
                        "first (DiffEmbed's own code needs no opt-in)")


def check_model_source(name: str, option: str = "MODEL") -> None:
    """A local folder, or something that can be a Hub id; a missing local path is named as such. A DiffEmbed
    folder's files are checked too (`checkpoint.check_model_files`), so that a damaged one is named in a
    second, before torch is imported; everything else about the folder is checked where it loads."""
    from ..model_folder import CONFIG, check_folder, check_model_files, local_folder

    try:
        folder = local_folder(name)
    except UsageError as err:
        raise UsageError(f"{option} {err}") from None
    if folder is None or not (folder / CONFIG).is_file():
        return
    check_folder(folder)  # nothing is read through a link that leads out of it
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {"model_type": "diffembed"}  # damaged: check_model_files names it
    if isinstance(config, dict) and config.get("model_type") == "diffembed":
        check_model_files(folder)


def check_device(name: str | None) -> None:
    """Refuse a device torch does not know or that this machine does not have."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type {device.type!r}; use cpu, cuda or mps")

