"""The embedded verifiable task: n-digit addition, "12+34=" -> "46".

A fixed held-out set (the same for every --seed) is excluded from the training prompts, so
accuracy before and after RL is measured on problems the policy never trained on. The reward
is an exact string check of the decoded response.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Set, Tuple

import torch


@dataclass(frozen=True)
class Problem:
    prompt: str   # "12+34="
    answer: str   # "46"


class AdditionTask:
    """Problems a+b with 0 <= a, b < 10**digits.

    Args:
        digits: operand width (1..4).
        n_heldout: size of the held-out evaluation set.
        split_seed: seed of the held-out split (fixed across training seeds on purpose).
    """

    def __init__(self, digits: int = 2, n_heldout: int = 256, split_seed: int = 1234):
        if not 1 <= digits <= 4:
            raise ValueError(f"digits: expected 1..4, got {digits}")
        self.digits = digits
        self.n_values = 10 ** digits
        total = self.n_values ** 2
        if not 0 < n_heldout <= total // 2:
            raise ValueError(f"n_heldout: expected 1..{total // 2}, got {n_heldout}")
        g = torch.Generator().manual_seed(split_seed)
        held = torch.randperm(total, generator=g)[:n_heldout].tolist()
        self._heldout_codes: Set[int] = set(held)
        self.heldout: List[Problem] = [self._problem(c) for c in held]

    def _problem(self, code: int) -> Problem:
        a, b = divmod(int(code), self.n_values)
        return Problem(prompt=f"{a}+{b}=", answer=str(a + b))

    def sample(self, n: int, generator: torch.Generator) -> List[Problem]:
        """n training problems drawn uniformly (with replacement) outside the held-out set."""
        out: List[Problem] = []
        total = self.n_values ** 2
        while len(out) < n:
            for c in torch.randint(0, total, (n,), generator=generator).tolist():
                if c not in self._heldout_codes and len(out) < n:
                    out.append(self._problem(c))
        return out

    @staticmethod
    def reward(response: str, problem: Problem) -> float:
        """1.0 when the response is exactly the answer (surrounding spaces ignored), else 0.0."""
        return 1.0 if response.strip() == problem.answer else 0.0

    def max_answer_chars(self) -> int:
        return len(str(2 * (self.n_values - 1)))


def rewards_for(texts: List[str], problems: List[Problem]) -> Tuple[List[float], float]:
    """Per-response rewards and their mean."""
    r = [AdditionTask.reward(t, p) for t, p in zip(texts, problems)]
    return r, (sum(r) / max(len(r), 1))
