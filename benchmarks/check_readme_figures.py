"""Every measured figure in README.md must come from a committed results file.

The convention (README, "Measured numbers"):
- A figure is a number with a unit of measure (ms, s, min, %, x, GB/s, GB, GiB, MB, MiB, KB, KiB; "14x", "18.9 ms",
  "0.61%") or a fraction written 0.dd... (an accuracy, a ratio: "0.734"), in README prose, lists and tables. Code
  blocks and `code spans` are not read.
- Each figure sits in a block (a paragraph, a list item or a table row) that names its results file(s):
  `benchmarks/results/<file>` as a code span or a link (a table also counts the files named in the paragraph right
  above it); a named folder (`benchmarks/results/compare_pathstar/`) stands for the files directly in it (a
  comparison's compare.md and compare.json), not those of its subfolders. The figure's number must be in one of the files that block names, at the README's precision: "18.9"
  is backed by 18.9, 18.88 or 18.93 in the file (thousands separators dropped); a ratio or sum computed for the
  README is not, so put it in the results file.
- A block of numbers that are not measurements here (arithmetic from sizes, figures quoted from a paper) carries
  the HTML comment `<!-- not measured -->`, and its figures are not checked.

Usage: python benchmarks/check_readme_figures.py [README.md]; prints each figure without a results file behind it
and exits 1 when there is one. tests/test_readme_figures.py runs it in CI.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results/"
EXEMPT = "<!-- not measured -->"
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
FIGURE = re.compile(rf"(?<![\w.\-/])({_NUM})(?:\s?[-–]\s?({_NUM}))?(?:(?:x|%)(?!\w)|\s?(?:ms|s|min|GB/s|GB|GiB|MB|MiB|KB|KiB)\b)"
                    rf"|(?<![\w.\-/])(0\.\d{{2,}})(?![\w.])")
FILE_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
NAMED_FILE = re.compile(re.escape(RESULTS) + r"[\w.\-]+(?:/[\w.\-]+)*")


def blocks(text: str) -> Iterator[Tuple[int, str]]:
    """(first line number, text) of each paragraph, list item and table outside code blocks. A table
    includes the paragraph right above it (its caption), so the files named there back its rows."""
    fenced, start, lines, caption = False, 0, [], None
    for i, line in enumerate(text.splitlines() + [""], 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        in_table = bool(lines) and lines[-1].lstrip().startswith("|")
        ends = not stripped or stripped.startswith(("- ", "* ", "#")) or re.match(r"\d+\. ", stripped) or \
            (lines and lines[0].lstrip().startswith("#")) or in_table != stripped.startswith("|")
        if lines and ends:
            if lines[0].lstrip().startswith("|"):
                yield start, "\n".join(([caption] if caption else []) + lines)
                caption = None
            else:
                caption = "\n".join(lines)
                yield start, caption
            lines = []
        elif not stripped:
            caption = None
        if stripped:
            if not lines:
                start = i
            lines.append(line)


def figures(block: str) -> List[str]:
    """The numbers of the block's figures, thousands separators dropped."""
    prose = re.sub(r"`[^`]*`", " ", block)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
    found = []
    for m in FIGURE.finditer(prose):
        found += [g.replace(",", "") for g in m.groups() if g]
    return found


def backed(figure: str, held: Set[str]) -> bool:
    """Whether a number of ``held`` (a results file's) is ``figure`` at the figure's precision."""
    places = len(figure.partition(".")[2])
    return any(n == figure or f"{float(n):.{places}f}" == figure for n in held)


def unbacked(readme: Path) -> List[str]:
    """One line per figure of ``readme`` that no results file of its block holds."""
    problems = []
    for line_no, block in blocks(readme.read_text()):
        if EXEMPT in block:
            continue
        numbers = figures(block)
        if not numbers:
            continue
        named = sorted(set(NAMED_FILE.findall(block)))
        if not named:
            problems.append(f"README.md:{line_no}: {', '.join(numbers)}: no {RESULTS}<file> named in this block")
            continue
        held, missing = set(), False
        for rel in named:
            path = readme.parent / rel
            if not path.exists():
                problems.append(f"README.md:{line_no}: {rel} does not exist")
                missing = True
                continue
            for file in sorted(path.iterdir()) if path.is_dir() else [path]:
                if file.is_file():
                    held.update(FILE_NUMBER.findall(file.read_text(errors="replace").replace(",", "")))
        for n in numbers:
            if not missing and not backed(n, held):
                problems.append(f"README.md:{line_no}: {n} is in none of {', '.join(named)}")
    return problems


def main(argv: List[str]) -> int:
    readme = Path(argv[0]) if argv else ROOT / "README.md"
    problems = unbacked(readme)
    for p in problems:
        print(p)
    print(f"{len(problems)} README figure(s) without a results file behind them" if problems
          else "every README figure has a results file behind it")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
