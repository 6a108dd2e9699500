"""README.md quotes no measured figure without a committed results file behind it
(benchmarks/check_readme_figures.py; the convention is in its docstring and the README)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from check_readme_figures import unbacked  # noqa: E402


def test_every_readme_figure_has_a_results_file():
    problems = unbacked(ROOT / "README.md")
    assert problems == [], "\n".join(problems)


def test_the_check_finds_figures_without_a_file(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "run.md").write_text("| cpp | 18.88 ms | 4,096 tokens | 0.734375 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("""# t

cpp takes 18.9 ms on 4,096 tokens (`benchmarks/results/run.md`); accuracy 0.734.

cpp takes 19.5 ms (`benchmarks/results/run.md`).

Unbacked: 14x faster, 0.61% of a step.

Missing file: 3 s (`benchmarks/results/gone.json`).

Results of [the run](benchmarks/results/run.md):

| what | value |
|---|---|
| time | 18.9 ms |

| orphan table | 2.5 GB |

Arithmetic, not a measurement: 16 GiB at H = 4,096. <!-- not measured -->

```bash
python x.py   # about 7 s; code blocks are not read
```
Code spans are not read: `sleep 5 s`, versions 3.11 and 2.13.0 are not figures.
""")
    problems = unbacked(readme)
    assert [p.split(":", 2)[1:] for p in problems] == [
        ["5", " 19.5 is in none of benchmarks/results/run.md"],
        ["7", " 14, 0.61: no benchmarks/results/<file> named in this block"],
        ["9", " benchmarks/results/gone.json does not exist"],
        ["17", " 2.5: no benchmarks/results/<file> named in this block"],
    ], problems
