"""The embedded verifiable tasks, selected with ``delta-train --task NAME`` (TASKS below).

Every task draws problems, keeps a fixed held-out set (the same for every --seed) out of the
training prompts, scores a decoded response with an exact check, gives the warm start a correct
response to imitate, and knows its decisive positions: the response tokens whose choice decides
the reward (``decisive``), from which the trainer logs credit AUC and gradient alignment and
builds the oracle credit.

- ``addition``: "12+34=" -> "46". Every response token is decisive: no credit can beat uniform.
- ``sparse``: the answer after L free filler tokens (SparseAnswerTask).
- ``pathstar``: choose the arm that ends at the target, then copy it (PathStarTask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Set, Tuple

import torch


@dataclass(frozen=True)
class Problem:
    prompt: str   # "12+34="
    answer: str   # the text the reward checks ("46")


class ExactAnswer:
    """The reward and demonstration of a task whose response is exactly ``problem.answer``."""

    @staticmethod
    def reward(response: str, problem: Problem) -> float:
        """1.0 when the response is exactly the answer (surrounding spaces ignored), else 0.0."""
        return 1.0 if response.strip() == problem.answer else 0.0

    def demonstration(self, problem: Problem, generator: torch.Generator) -> str:
        """A correct response (what the supervised warm start imitates)."""
        return problem.answer


class AdditionTask(ExactAnswer):
    """Problems a+b with 0 <= a, b < 10**digits.

    Args:
        digits: operand width (1..4).
        n_heldout: size of the held-out evaluation set.
        split_seed: seed of the held-out split (fixed across training seeds on purpose).

    Why credit cannot matter here: the 2-4 response tokens are all digits of the answer (and its
    eos), each one decisive, so every credit method that keeps the mean at 1 is uniform credit.
    """

    name = "addition"
    chars = "0123456789+=- "
    has_free_tokens = False  # every response token is decisive

    def __init__(self, digits: int = 2, n_heldout: int = 256, split_seed: int = 1234):
        if not 1 <= digits <= 4:
            raise ValueError(f"--digits: expected 1..4, got {digits}")
        self.digits = digits
        self.n_values = 10 ** digits
        total = self.n_values ** 2
        if not 0 < n_heldout <= total // 2:
            raise ValueError(f"--heldout-size: expected 1..{total // 2}, got {n_heldout}")
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

    def max_answer_chars(self) -> int:
        return len(str(2 * (self.n_values - 1)))

    def max_response_chars(self) -> int:
        """Characters of the longest correct response (eos not counted)."""
        return self.max_answer_chars()

    def decisive(self, tokens: Sequence[str], problem: Problem, eos: str) -> List[bool]:
        """One flag per response token (``eos`` is the eos token's text): all decisive."""
        return [True] * len(tokens)


class SparseAnswerTask(AdditionTask):
    """Addition whose response is L free filler letters, "|", then the answer:
    "12+34=" -> "fbhadcge...|46". The reward reads only the text after the first "|".

    Why credit matters: the filler letters are drawn uniformly from a small alphabet in the warm
    start, so they stay high-entropy, and the reward ignores them; only the answer tokens after
    "|" (the digits and the eos ending them) decide the reward. Uniform credit hands each response's advantage
    to all L + 1 + |answer| tokens, so the filler gets as much gradient per token as the answer: a
    zero-mean signal that adds noise to the shared parameters, takes a share of the clipped
    gradient norm and of AdamW's second moment, and is L times larger than the answer's at large L.
    Credit that finds the answer tokens (the oracle) removes it; L = 0 is the null case where
    every response token is decisive and the oracle equals uniform credit.

    Args (beyond AdditionTask's): filler_len L >= 0, filler_chars (alphabet size, 1..16).
    """

    name = "sparse"
    has_free_tokens = True
    FILLER = "abcdefghijklmnop"
    chars = AdditionTask.chars + "|" + FILLER

    def __init__(self, digits: int = 2, n_heldout: int = 1024, split_seed: int = 1234, filler_len: int = 16,
                 filler_chars: int = 8):
        super().__init__(digits, n_heldout, split_seed)
        if filler_len < 0:
            raise ValueError(f"--filler-len: expected >= 0, got {filler_len}")
        if not 1 <= filler_chars <= len(self.FILLER):
            raise ValueError(f"--filler-chars: expected 1..{len(self.FILLER)}, got {filler_chars}")
        self.filler_len, self.alphabet = filler_len, self.FILLER[:filler_chars]

    @staticmethod
    def reward(response: str, problem: Problem) -> float:
        """1.0 when the text after the first "|" is exactly the answer, else 0.0."""
        head, sep, tail = response.partition("|")
        return 1.0 if sep and tail.strip() == problem.answer else 0.0

    def demonstration(self, problem: Problem, generator: torch.Generator) -> str:
        idx = torch.randint(0, len(self.alphabet), (self.filler_len,), generator=generator).tolist()
        return "".join(self.alphabet[i] for i in idx) + "|" + problem.answer

    def max_response_chars(self) -> int:
        return self.filler_len + 1 + self.max_answer_chars()

    def decisive(self, tokens: Sequence[str], problem: Problem, eos: str) -> List[bool]:
        """The tokens after the first one holding "|" (the answer and its eos)."""
        out, seen = [], False
        for t in tokens:
            out.append(seen)
            seen = seen or "|" in t
        return out


class PathStarTask(ExactAnswer):
    """"Choose the first edge": the prompt lists `branches` arms of `path_len` digits, then the
    target, the last digit of one arm: "3141,5926,5358>6=" -> "5926". Arms start with distinct
    digits and end with distinct digits, so the first response token decides which arm is
    followed; the rest is a copy of that arm.

    Why credit matters: correct and wrong responses share their shape, and after the first token a
    failed response usually copies its (wrong) arm correctly. Uniform credit pushes those correct
    copy tokens down in every failed response and up in every correct one, so the shared copying
    skill gets conflicting gradients: a bias, not only noise, that grows with path_len. Only the
    first token (and a copy error, when there is one) is decisive; the oracle credits those alone.

    Args: branches (2..5), path_len (2..8), n_heldout, split_seed.
    """

    name = "pathstar"
    has_free_tokens = True
    chars = "0123456789,>="

    def __init__(self, branches: int = 3, path_len: int = 6, n_heldout: int = 1024, split_seed: int = 1234):
        if not 2 <= branches <= 5:
            raise ValueError(f"--branches: expected 2..5, got {branches}")
        if not 2 <= path_len <= 8:
            raise ValueError(f"--path-len: expected 2..8, got {path_len}")
        if n_heldout < 1:
            raise ValueError(f"--heldout-size: expected >= 1, got {n_heldout}")
        self.branches, self.path_len = branches, path_len
        g = torch.Generator().manual_seed(split_seed)
        self.heldout: List[Problem] = [self._draw(g) for _ in range(n_heldout)]
        self._heldout_prompts = {p.prompt for p in self.heldout}

    def _draw(self, g: torch.Generator) -> Problem:
        k, m = self.branches, self.path_len
        firsts = torch.randperm(10, generator=g)[:k].tolist()
        lasts = torch.randperm(10, generator=g)[:k].tolist()
        mids = torch.randint(0, 10, (k, m - 2), generator=g).tolist()
        arms = ["".join(map(str, [f] + mid + [l])) for f, mid, l in zip(firsts, mids, lasts)]
        pick = int(torch.randint(0, k, (1,), generator=g))
        return Problem(prompt=",".join(arms) + f">{lasts[pick]}=", answer=arms[pick])

    def sample(self, n: int, generator: torch.Generator) -> List[Problem]:
        out: List[Problem] = []
        while len(out) < n:
            p = self._draw(generator)
            if p.prompt not in self._heldout_prompts:
                out.append(p)
        return out

    def max_response_chars(self) -> int:
        return self.path_len

    def arms(self, problem: Problem) -> Dict[str, str]:
        """First digit -> arm, from the prompt."""
        return {a[0]: a for a in problem.prompt.split(">")[0].split(",")}

    def decisive(self, tokens: Sequence[str], problem: Problem, eos: str) -> List[bool]:
        """The first token, and every later token that departs from the copy of the arm the first
        token chose (the arm's digits, then eos)."""
        if not tokens:
            return []
        arm = self.arms(problem).get(tokens[0])
        if arm is None:
            return [True] + [False] * (len(tokens) - 1)
        expected = list(arm) + [eos]
        return [True] + [t >= len(expected) or tok != expected[t] for t, tok in enumerate(tokens) if t > 0]


TASKS = {"addition": AdditionTask, "sparse": SparseAnswerTask, "pathstar": PathStarTask}


def build_task(cfg):
    """The task named by ``cfg.task`` with its options from the config (a TrainerConfig)."""
    if cfg.task not in TASKS:
        raise ValueError(f"--task: unknown task {cfg.task!r}; expected one of {', '.join(TASKS)}")
    if cfg.task == "addition":
        return AdditionTask(digits=cfg.digits, n_heldout=cfg.heldout_size)
    if cfg.task == "sparse":
        return SparseAnswerTask(digits=cfg.digits, n_heldout=cfg.heldout_size, filler_len=cfg.filler_len,
                                filler_chars=cfg.filler_chars)
    return PathStarTask(branches=cfg.branches, path_len=cfg.path_len, n_heldout=cfg.heldout_size)


def decisive_mask(task, token_texts: List[List[str]], problems: List[Problem], eos: str, width: int,
                  device) -> torch.Tensor:
    """[B, width] bool: the task's decisive flags of each response's valid tokens (False on padding)."""
    out = torch.zeros((len(problems), width), dtype=torch.bool)
    for i, (toks, p) in enumerate(zip(token_texts, problems)):
        flags = task.decisive(toks, p, eos)
        out[i, :len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return out.to(device)


def rewards_for(texts: List[str], problems: List[Problem]) -> Tuple[List[float], float]:
    """Per-response rewards and their mean."""
    r = [AdditionTask.reward(t, p) for t, p in zip(texts, problems)]
    return r, (sum(r) / max(len(r), 1))
