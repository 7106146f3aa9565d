"""MkDocs hook: the pages and images the site takes from the code rather than from hand-written Markdown.

* `reference/cli.md` is rendered from the `diffembed` argparse parsers (every command, option and default), so
  the command-line reference cannot drift from the command line.
* The benchmark charts (`benchmarks/results/*.png`, drawn by the benchmark scripts next to their JSON) are
  published under `assets/results/`, so the Benchmarks page embeds the files the scripts wrote.

The parser module imports no third-party package, so the docs build needs neither torch nor the package
installed: `src/` is put on the import path here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI_PAGE = "reference/cli.md"
RESULTS = ROOT / "benchmarks" / "results"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _help(action: argparse.Action, prog: str) -> str:
    """The option's help as `--help` expands it (%(default)s, %(choices)s, ...), without the appended default."""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return (action.help or "") % dict(params, prog=prog)


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is argparse.SUPPRESS or value is None or isinstance(value, bool) or not action.option_strings:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"`{value}`"


def _argument(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    return f"`{metavar}`" if not isinstance(metavar, tuple) else " ".join(f"`{m}`" for m in metavar)


def _parser_section(parser: argparse.ArgumentParser, title: str, summary: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{title}`", ""]
    if summary:
        lines += [_cell(summary)[0].upper() + _cell(summary)[1:] + ".", ""]
    if parser.description and parser.description != summary:
        lines += [_cell(parser.description), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    rows, subcommands = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands.append(action)
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        rows.append(f"| {name} | {_argument(action)} | {_default(action)} | {_cell(_help(action, parser.prog))} |")
    if rows:
        lines += ["| argument | value | default | description |", "|---|---|---|---|", *rows, ""]
    for action in subcommands:
        for choice in action._choices_actions:
            sub = action.choices[choice.dest]
            lines += _parser_section(sub, f"{title} {choice.dest}", choice.help or "", level + 1)
    return lines


def cli_reference_markdown() -> str:
    """The command-line reference page, from `diffembed_hf.cli.build_parser()`."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    from diffembed_hf.cli import build_parser

    header = [
        "# Command line",
        "",
        "Generated from the `diffembed` argument parsers when the site is built (`docs/hooks/generated_pages.py`);",
        "`diffembed COMMAND --help` prints the same options. `python -m diffembed_hf` is the same command (use it",
        "under `torchrun`). What holds for every command (errors and exit statuses, locks, outputs, trust) is on",
        "[Command-line behaviour](cli-behaviour.md).",
        "",
    ]
    return "\n".join(header + _parser_section(build_parser(), "diffembed", "", 2)) + "\n"


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, CLI_PAGE, content=cli_reference_markdown()))
    for image in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/results/{image.name}", abs_src_path=str(image)))
    return files
