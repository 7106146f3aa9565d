"""`diffembed export vllm`: a DiffEmbed folder in the form vLLM serves with its own model code (see
`diffembed_hf.export`)."""

from __future__ import annotations

import argparse
import signal
import sys

from .common import add_output_options


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="write a DiffEmbed folder in the form an inference engine serves")
    engines = export.add_subparsers(dest="engine", required=True, metavar="ENGINE")
    vllm = engines.add_parser("vllm", help="a folder vLLM serves as an embedding model with no remote code "
                              "(stock Qwen2/Llama config, is_causal false, weights hard-linked)")
    vllm.add_argument("model", help="a DiffEmbed folder (diffembed convert / train), or a LoRA adapter folder "
                      "(train --adapter-only), merged into its local base first")
    vllm.add_argument("output", help="the folder to create")
    vllm.add_argument("--overwrite", action="store_true", help="replace OUTPUT once the new folder is complete")
    add_output_options(vllm)  # the engine's parser is the one that reads the rest of the command line
    vllm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_vllm

    # SIGTERM becomes SystemExit, so the half-built temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    output = export_vllm(args.model, args.output, overwrite=args.overwrite)
    print(f"vLLM folder: {output} (its README.md gives the serve command and the query prompt)")
    return 0
