"""The documentation cannot drift from the code: the blocks README.md and the getting-started page mark runnable
run as written (`tests/docs_blocks.py` says how blocks are marked), CI's test command is the README's, and the
command-line reference lists every option of every parser."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from docs_blocks import marked_blocks, the_block

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md"]


def run_blocks(page: Path, workdir: Path, markers: set[str]) -> int:
    """Run `page`'s blocks marked with one of `markers`, in page order, in `workdir`; the count run. A failing
    block fails the test with its page, line, code and output."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    count = 0
    for block in marked_blocks(page):
        if block.marker not in markers:
            continue
        if block.language == "python":
            command = [sys.executable, "-c", block.code]
        elif block.language in ("bash", "sh", "shell"):
            command = ["bash", "-euo", "pipefail", "-c", block.code]
        else:
            raise AssertionError(f"{page.name}:{block.line}: a runnable block must be bash or python, "
                                 f"not {block.language!r}")
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        where = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name
        assert done.returncode == 0, (f"{where}:{block.line}: documented block failed "
                                      f"(exit status {done.returncode}):\n{block.code}\n--- output ---\n"
                                      f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
        count += 1
    return count


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quick_runnable_blocks_run_as_written(page, tmp_path):
    run_blocks(page, tmp_path, {"runnable"})


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_runnable_block_runs_as_written(page, tmp_path):
    run_blocks(page, tmp_path, {"runnable", "runnable: slow"})


def test_the_getting_started_page_has_quick_and_slow_runnable_blocks():
    markers = [b.marker for b in marked_blocks(ROOT / "docs" / "getting-started.md")]
    assert "runnable" in markers and "runnable: slow" in markers  # neither suite runs nothing from it


def test_a_failing_block_fails_the_run(tmp_path):
    """Control: the runner reports a documented command that fails (so a passing run means the blocks ran)."""
    page = tmp_path / "page.md"
    page.write_text("<!-- runnable -->\n```bash\ntrue\n```\n\ntext\n\n<!-- runnable -->\n```python\n"
                    "import sys; sys.exit(3)\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"page.md:9: documented block failed \(exit status 3\)"):
        run_blocks(page, tmp_path, {"runnable"})


def test_markers_are_checked(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- runable -->\n```bash\ntrue\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown block marker 'runable'"):
        marked_blocks(page)
    page.write_text("<!-- runnable -->\n\n```bash\ntrue\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not directly followed by a fenced block"):
        marked_blocks(page)


def test_ci_runs_the_readme_test_command_and_getting_started_repeats_both_commands():
    command = the_block(ROOT / "README.md", "test-command").code
    assert "pytest" in command and command.count("\n") == 0
    printed = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_blocks.py"), "test-command",
                              str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout
    assert printed == command + "\n"  # what .ci/run executes
    assert "tests/docs_blocks.py test-command README.md" in (ROOT / ".ci" / "run").read_text()
    for marker in ("test-command", "main-command"):
        in_docs = the_block(ROOT / "docs" / "getting-started.md", marker).code
        assert in_docs == the_block(ROOT / "README.md", marker).code, marker


def _hook():
    spec = importlib.util.spec_from_file_location("generated_pages", ROOT / "docs" / "hooks" / "generated_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_cli_reference_lists_every_command_option_and_default():
    from diffembed_hf.cli import build_parser

    page = _hook().cli_reference_markdown()
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 8  # every command (and export's engine) was walked
    for parser in parsers:
        assert f"`{parser.prog}`" in page, parser.prog
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in page, (parser.prog, option)
            default = action.default
            if (action.option_strings and isinstance(default, (int, float, str)) and not isinstance(default, bool)
                    and default is not argparse.SUPPRESS):
                assert f"`{default}`" in page, (parser.prog, action.option_strings, default)


def test_the_project_cites_only_pages_inside_it():
    """Code and tests cite docs/ pages that exist, and nothing outside the repository (design notes that a reader
    of the project alone could not open)."""
    outside = ("../" + "shared", "shared/" + "design")  # spelt apart, so that this file does not match itself
    cited = set()
    for folder in ("src", "modeling", "tests", "benchmarks", "examples", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if not path.is_file() or path.suffix not in (".py", ".md", ".yaml", "") or "__pycache__" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            assert not any(name in text for name in outside), path
            cited |= set(re.findall(r"\bdocs/[\w/.-]+?\.md\b", text))
    assert "docs/design/evaluation.md" in cited  # control: the search finds the citations there are
    assert not [page for page in cited if not (ROOT / page).is_file()]
