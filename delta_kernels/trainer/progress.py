"""The RL loop's progress: a tqdm bar on a terminal; under a pipe or CI (CI set, or stderr not a
terminal) one plain line every ``every`` steps and at the last step, instead of a bar that
redraws itself with carriage returns into one long line."""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

from .._optional import require

LINES_PER_RUN = 20  # the default ``every``: about this many lines for a whole run


def on_terminal(stream: TextIO) -> bool:
    return not os.environ.get("CI") and hasattr(stream, "isatty") and stream.isatty()


class StepProgress:
    """``update(step, **fields)`` after each of ``steps`` steps; ``close()`` at the end. Nothing is
    shown when ``enabled`` is false (--no-progress, the ranks other than 0)."""

    def __init__(self, steps: int, desc: str, enabled: bool = True, stream: Optional[TextIO] = None,
                 every: Optional[int] = None):
        self.steps, self.desc, self.stream = steps, desc, stream or sys.stderr
        self.every = every or max(steps // LINES_PER_RUN, 1)
        self.bar = None
        self.enabled = enabled
        if enabled and on_terminal(self.stream):
            self.bar = require("tqdm.auto", "trainer").tqdm(total=steps, desc=desc, file=self.stream,
                                                              dynamic_ncols=True)

    def update(self, step: int, **fields: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**fields, refresh=False)
            self.bar.update(1)
        elif self.enabled and ((step + 1) % self.every == 0 or step + 1 == self.steps):
            values = " ".join(f"{k} {v}" for k, v in fields.items())
            print(f"{self.desc} step {step + 1}/{self.steps}: {values}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
