"""Sampling responses with a KV cache through the model's own forward (no model.generate).

Layout of a rollout batch: prompts left-padded to P tokens, responses right-padded to T, so
row b is ``[pad.. prompt | response .. pad]`` and response token t sits at column P + t.
The hidden state that predicts it is the one at column P + t - 1.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class Rollout:
    input_ids: torch.Tensor       # [B, P+T] int64
    attention_mask: torch.Tensor  # [B, P+T] int64, 0 on padding
    prompt_len: int               # P
    response_ids: torch.Tensor    # [B, T] int64 (pad after eos)
    response_mask: torch.Tensor   # [B, T] bool: sampled tokens, eos included

    @property
    def position_ids(self) -> torch.Tensor:
        return positions(self.attention_mask)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the non-padding tokens of its row (0 on left padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(list(x), dtype=torch.long)
        mask[i, p - len(x):] = 1
    return ids.to(device), mask.to(device)


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers >= 5.2x calls the KV cache ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_responses(model: torch.nn.Module, prompts: List[List[int]], *, max_new_tokens: int, eos_id: int,
                     pad_id: int, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                     greedy: bool = False) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups): temperature sampling, or
    argmax when ``greedy``. Stops when every row has produced eos or after max_new_tokens.
    One model forward per generated token (the first one over the whole prompt)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    b, p = ids.shape
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out_ids, out_mask = [], []
    step_ids, step_pos, past = ids, positions(mask), None
    cache_arg = _cache_argument(model)
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                    **{cache_arg: past})
        past = getattr(out, cache_arg)
        logits = out.logits[:, -1, :].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        live = ~finished
        out_ids.append(torch.where(live, nxt, torch.full_like(nxt, pad_id)))
        out_mask.append(live)
        finished = finished | (nxt == eos_id)
        if bool(finished.all()):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
    resp = torch.stack(out_ids, dim=1)
    resp_mask = torch.stack(out_mask, dim=1)
    full_ids = torch.cat([ids, resp], dim=1)
    full_mask = torch.cat([mask[:, :p], resp_mask.long()], dim=1)
    return Rollout(input_ids=full_ids, attention_mask=full_mask, prompt_len=p, response_ids=resp,
                   response_mask=resp_mask)
