"""The built-in retrieval task: find a Python function's code from its docstring summary.

Real text nobody on this project wrote, available offline everywhere: the running Python's standard library.
Each function with a docstring gives one row: query = the docstring's first line, positive = the function's
source with that line removed (the rest of the docstring and the code stay, the query is never copied into
the document), hard negative = another function of the same module. Training and held-out rows come from
disjoint modules.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import random
from pathlib import Path

from .outputs import write_text

logger = logging.getLogger(__name__)

INSTRUCTION = "Given a description of a Python function, retrieve the function's code"
TRAIN_MODULES = (
    "argparse", "ast", "calendar", "configparser", "csv", "difflib", "dis", "email", "fractions", "ftplib",
    "gettext", "gzip", "heapq", "imaplib", "inspect", "ipaddress", "logging", "mailbox", "nntplib", "optparse",
    "pathlib", "pickle", "pickletools", "platform", "pydoc", "shutil", "smtplib", "statistics", "subprocess",
    "tarfile", "textwrap", "threading", "tokenize", "traceback", "turtle", "typing", "zipfile", "collections",
    "concurrent", "dataclasses", "decimal", "doctest", "enum", "functools", "http", "json", "random", "sqlite3",
)
HELD_OUT_MODULES = ("asyncio", "unittest", "urllib", "xml", "multiprocessing", "tkinter", "idlelib")


def _module_files(name: str) -> list[Path]:
    """The source files of a standard-library module or package (missing ones are skipped: builds differ)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    origin = Path(spec.origin)
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def _functions(path: Path, max_chars: int) -> list[tuple[str, str]]:
    """(docstring summary, code without its docstring) for every documented function in a file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        summary = docstring.strip().splitlines()[0].strip() if docstring else ""
        if len(summary.split()) < 4 or len(node.body) < 2:
            continue
        rest = docstring.strip().split("\n", 1)[1].strip() if "\n" in docstring.strip() else ""
        # the summary line leaves the document: the query must not be copied into it
        node.body = [ast.Expr(ast.Constant(rest)), *node.body[1:]] if rest else node.body[1:]
        code = ast.unparse(node)
        if len(code) <= max_chars:
            pairs.append((summary, code))
    return pairs


def build_rows(modules: tuple[str, ...], seed: int = 0, max_chars: int = 1500) -> list[dict[str, str]]:
    """Rows of (instruction, query, positive, negative), one per documented function, duplicates removed."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for module in modules:
        functions = [pair for path in _module_files(module) for pair in _functions(path, max_chars)]
        functions = [(q, c) for q, c in functions if q not in seen and not seen.add(q)]
        for index, (query, code) in enumerate(functions):
            if len(functions) < 2:
                break
            negative = functions[rng.choice([i for i in range(len(functions)) if i != index])][1]
            rows.append({"instruction": INSTRUCTION, "query": query, "positive": code, "negative": negative})
    rng.shuffle(rows)
    return rows


def write_task(folder: str | Path, *, max_train: int | None = None, max_eval: int | None = None,
               seed: int = 0, train: bool = True) -> tuple[Path, Path]:
    """Write train.jsonl (unless not `train`) and heldout.jsonl (disjoint modules) into `folder`; return their
    paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = (("train", TRAIN_MODULES, max_train),) if train else ()
    for name, modules, limit in (*parts, ("heldout", HELD_OUT_MODULES, max_eval)):
        rows = build_rows(modules, seed)[:limit]
        if not rows:
            raise RuntimeError(f"No documented functions found in the standard library modules {modules}")
        path = folder / f"{name}.jsonl"
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        logger.info("%s: %d rows from %d modules", path, len(rows), len(modules))
    return folder / "train.jsonl", folder / "heldout.jsonl"
