"""Greedy accuracy on a fixed problem set."""
from __future__ import annotations

from typing import Callable, List

import torch

from .rollout import sample_responses
from .task import AdditionTask, Problem


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: List[Problem], max_new_tokens: int, batch_size: int = 256,
                    reward: Callable[[str, Problem], float] = AdditionTask.reward) -> float:
    """Mean ``reward`` (a task's reward: 1 when the greedy response is right) over the problems."""
    was_training = model.training
    model.eval()
    correct = 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        r = sample_responses(model, [tokenizer.encode(p.prompt) for p in chunk], max_new_tokens=max_new_tokens,
                             eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, greedy=True)
        correct += sum(reward(tokenizer.decode(ids), p) for ids, p in zip(r.response_ids.tolist(), chunk))
    model.train(was_training)
    return correct / max(len(problems), 1)
