"""`diffembed` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile


def _demo(args: argparse.Namespace) -> int:
    from .demo import QUERY, run_demo

    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    ranking = run_demo(output)
    print(f"DiffEmbed folder: {output}  (untrained default model: the ranking is not meaningful yet)")
    print(f"query: {QUERY}")
    for rank, (score, document) in enumerate(ranking, 1):
        print(f"{rank}. {score:+.4f}  {document}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffembed", description="Diffusion language models as text embedders.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build, save, reload (trust_remote_code) and rank with the default model")
    demo.add_argument("--output", help="folder to write the Hub-ready checkpoint to (default: a new temp folder)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
