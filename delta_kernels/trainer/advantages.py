"""GRPO group-normalised advantages."""
from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """[B] rewards, B = prompts * group_size with each prompt's responses adjacent -> [B] float32
    advantages ``(r - mean_group) / (std_group + eps)`` (unbiased std, as verl's GRPO); exactly
    zero for a group whose rewards are all equal."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: expected [prompts * {group_size}], got shape {list(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = (r - mean) / (std + eps)
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(adv), adv).view(-1)
