"""The code blocks README.md and the docs mark, found by an HTML comment on the line before the fence (invisible
on GitHub and on the site):

    <!-- test-command -->     the suite's command; CI runs exactly this block (`.ci/run`)
    <!-- main-command -->     the main job's command (the demo: 16 minutes; CI's slow tests run the demo itself)
    <!-- runnable -->         run by tests/test_docs.py in the quick suite (seconds)
    <!-- runnable: slow -->   run by tests/test_docs.py under `-m slow` (minutes)

Blocks of one page run in page order in one working directory, so a block may use what an earlier one wrote.
Standard library only: `.ci/run` calls it with the system Python before any environment exists:

    python3 tests/docs_blocks.py test-command README.md
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

MARKERS = ("test-command", "main-command", "runnable", "runnable: slow")
_BLOCK = re.compile(r"^<!-- (?P<marker>[a-z: -]+?) -->\n```(?P<language>[\w-]*)\n(?P<code>.*?)\n```$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    marker: str
    language: str
    code: str


def marked_blocks(page: str | Path) -> list[Block]:
    """Every marked block of `page`, in page order; a marker this module does not know is an error (a typo would
    silently leave a block untested)."""
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in _BLOCK.finditer(text):
        if match["marker"] not in MARKERS:
            raise ValueError(f"{page}:{text.count(chr(10), 0, match.start()) + 1}: unknown block marker "
                             f"{match['marker']!r} (known: {', '.join(MARKERS)})")
        blocks.append(Block(page, text.count("\n", 0, match.start()) + 2, match["marker"], match["language"],
                            match["code"]))
    stray = len(re.findall(r"^<!-- (?:test-command|main-command|runnable[^>]*) -->$", text, re.M))
    if stray != len(blocks):
        raise ValueError(f"{page}: {stray - len(blocks)} block marker(s) not directly followed by a fenced block")
    return blocks


def the_block(page: str | Path, marker: str) -> Block:
    """The one block of `page` with `marker` (ValueError if there is none or more than one)."""
    found = [b for b in marked_blocks(page) if b.marker == marker]
    if len(found) != 1:
        raise ValueError(f"{page}: {len(found)} blocks marked <!-- {marker} -->, expected exactly one")
    return found[0]


if __name__ == "__main__":
    marker, page = sys.argv[1], sys.argv[2]
    print(the_block(page, marker).code)
