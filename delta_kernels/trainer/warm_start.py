"""Supervised warm start on correct responses (the task's demonstrations), stopped as soon as
greedy accuracy on a probe set reaches a target, so that RL starts from a policy that is right
some of the time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .evaluate import greedy_accuracy
from .rollout import left_pad, positions


@dataclass
class WarmStartConfig:
    max_steps: int = 600
    target_accuracy: float = 0.3   # stop once probe accuracy reaches this
    check_every: int = 25
    batch_size: int = 128
    lr: float = 3e-3
    probe_size: int = 128


def supervised_warm_start(model, tokenizer, task, cfg: WarmStartConfig,
                          generator: torch.Generator, max_new_tokens: int) -> Dict:
    """Cross-entropy on "prompt -> demonstration<eos>" (response tokens only), the demonstration
    being task.demonstration(problem) (the answer, or filler then the answer). Returns a summary dict."""
    device = next(model.parameters()).device
    probe = task.sample(cfg.probe_size, generator)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    history: List[Dict] = []
    steps, acc = 0, greedy_accuracy(model, tokenizer, probe, max_new_tokens, reward=task.reward)
    while steps < cfg.max_steps and acc < cfg.target_accuracy:
        model.train()
        for _ in range(cfg.check_every):
            batch = task.sample(cfg.batch_size, generator)
            prompts = [tokenizer.encode(p.prompt) for p in batch]
            skip = 1 if tokenizer.bos_token_id is not None else 0
            answers = [tokenizer.encode(task.demonstration(p, generator))[skip:]
                       + [tokenizer.eos_token_id] for p in batch]
            seqs = [p + a for p, a in zip(prompts, answers)]
            ids, mask = left_pad([s[::-1] for s in seqs], tokenizer.pad_token_id, device)  # right-pad
            ids, mask = ids.flip(1), mask.flip(1)
            labels = torch.full_like(ids, -100)
            for i, (p, a) in enumerate(zip(prompts, answers)):
                labels[i, len(p):len(p) + len(a)] = torch.tensor(a, device=device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        acc = greedy_accuracy(model, tokenizer, probe, max_new_tokens, reward=task.reward)
        history.append(dict(step=steps, loss=float(loss.detach()), probe_accuracy=acc))
    model.eval()
    return dict(steps=steps, probe_accuracy=acc, history=history)
