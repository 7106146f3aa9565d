"""`diffembed convert`: an upstream checkpoint (Dream, LLaDA, Qwen2, Llama, Mistral) into a Hub-ready DiffEmbed
folder (see `diffembed_hf.convert`)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..errors import UsageError
from .common import add_trust_option, byte_size, positive_int


def add_parser(commands) -> None:
    conv = commands.add_parser("convert", help="convert a Dream / LLaDA / Qwen2 / Llama / Mistral checkpoint "
                               "into a Hub-ready DiffEmbed folder")
    conv.add_argument("source", help="a local checkpoint folder, a Hub id, or a GGUF file (MODEL.gguf, or a folder "
                      "holding one; pip install 'diffembed-hf[gguf]')")
    conv.add_argument("output", help="the folder to create")
    conv.add_argument("--family", choices=["dream", "llada", "qwen2", "llama", "mistral"],
                      help="force the source family (default: from config.json's model_type)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT once the new folder is complete")
    conv.add_argument("--max-shard-size", type=byte_size, default="5GB", help="output shard size cap, e.g. 5GB or "
                      "500MiB")
    conv.add_argument("--max-seq-length", type=positive_int,
                      help="sentence-transformers truncation length (default: min(max positions, 4096))")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="accept .bin weights, loaded with torch.load(weights_only=True)")
    conv.add_argument("--ignore-sliding-window", action="store_true",
                      help="convert a sliding-window source (e.g. Mistral v0.1) to full attention")
    add_trust_option(conv, "the source's tokenizer")
    conv.add_argument("--revision", help="Hub revision (branch, tag or commit) for a Hub id (default: main)")
    conv.add_argument("--gguf-file", metavar="NAME", help="the GGUF file in the folder SOURCE, where it holds several "
                      "(default: its only .gguf file)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="what a GGUF source is "
                      "dequantized to (default: float32; other sources keep their dtype)")
    conv.set_defaults(func=run)


def convert_options(args: argparse.Namespace):
    """The `ConvertOptions` of the command line."""
    from ..convert import ConvertOptions

    return ConvertOptions(
        family=args.family, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
        max_seq_length=args.max_seq_length, allow_pickle=args.allow_pickle,
        ignore_sliding_window=args.ignore_sliding_window, trust_remote_code=args.trust_remote_code,
        revision=args.revision, gguf_file=args.gguf_file, dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    if Path(args.output).exists() and not args.overwrite:  # at once, before the heavy imports
        raise UsageError(f"{Path(args.output).absolute()} already exists; pass --overwrite to replace it")
    from ..convert import convert_checkpoint

    # SIGTERM (kill, a job scheduler) becomes SystemExit, so the half-built temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    output = convert_checkpoint(args.source, args.output, convert_options(args))
    print(f"DiffEmbed folder: {output}")
    return 0
