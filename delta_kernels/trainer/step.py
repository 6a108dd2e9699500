"""One RL step: rollouts, reward, GRPO advantages, the old-log-prob pass (hidden states
captured on the way into the LM head), DelTA coefficients, and clipped-surrogate updates.

Model forwards per step, identical for --credit delta and --credit none:
    generation: one per generated token (KV cache), at most max_new_tokens;
    old-log-prob: 1 (the hidden states for DelTA are captured there, no extra forward);
    update: one forward + backward per mini-batch.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import delta_kernels

from .advantages import grpo_advantages
from .model import lm_head_of
from .rollout import Rollout, sample_responses
from .task import AdditionTask, Problem


@dataclass
class OldLogprobs:
    logp: torch.Tensor     # [B, T] float32, log-prob of each response token under the behaviour policy
    entropy: torch.Tensor  # [B, T] float32, entropy of the next-token distribution
    hidden: torch.Tensor   # [B, T, H] model dtype, hidden state entering the LM head for each response token


@dataclass
class CreditConfig:
    credit: str = "delta"          # "delta" or "none"
    k: int = 1
    lam_min: float = 0.8
    lam_max: float = 1.2
    sketch_dim: Optional[int] = None
    sketch_seed: int = 0
    backend: str = "auto"


@dataclass
class UpdateConfig:
    minibatches: int = 4
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0
    agg: str = "token-mean"
    max_grad_norm: float = 1.0
    temperature: float = 1.0


class ForwardCounter:
    """Counts calls of the model's top-level forward while active."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.count, self._h = model, 0, None

    def __enter__(self):
        self._h = self.model.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        self.count += 1

    def __exit__(self, *exc):
        self._h.remove()


@contextlib.contextmanager
def capture_head_input(model: torch.nn.Module, store: Dict[str, torch.Tensor]):
    """Forward pre-hook on the LM head: stores its input (the final hidden states) in store["hidden"]."""
    def hook(module, args):
        store["hidden"] = args[0]
    handle = lm_head_of(model).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _response_columns(rollout: Rollout, kept: int) -> slice:
    """Columns, in a frame holding the last ``kept`` positions, of the states predicting the response."""
    p, t = rollout.prompt_len, rollout.response_ids.shape[1]
    offset = rollout.input_ids.shape[1] - kept
    return slice(p - 1 - offset, p + t - 1 - offset)


def _response_forward(model: torch.nn.Module, rollout: Rollout, store: Optional[Dict] = None) -> torch.Tensor:
    """One model forward over the rollout; returns logits [B, T, V] predicting the response tokens.
    Only the last T+1 positions go through the LM head when the model supports it."""
    t = rollout.response_ids.shape[1]
    kwargs = {"logits_to_keep": t + 1} if _takes_logits_to_keep(model) else {}
    ctx = capture_head_input(model, store) if store is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                    position_ids=rollout.position_ids, use_cache=False, **kwargs)
    cols = _response_columns(rollout, out.logits.shape[1])
    if store is not None:
        store["hidden"] = store["hidden"][:, cols]
    return out.logits[:, cols]


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, targets[..., None]).squeeze(-1), logprobs


@torch.no_grad()
def old_logprob_pass(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0) -> OldLogprobs:
    """The behaviour policy's log-probs of the sampled tokens, their entropies, and the hidden
    states entering the LM head, all from ONE forward (a pre-hook on the LM head captures h).

    This is the single place that would switch to delta_kernels.fused_linear_logprob_sketch(
    hidden, lm_head.weight, targets, ...) to skip the [B, T, V] logits."""
    store: Dict[str, torch.Tensor] = {}
    logits = _response_forward(model, rollout, store)
    logp, logprobs = _token_logprobs(logits, rollout.response_ids, temperature)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return OldLogprobs(logp=logp.clamp(max=0.0), entropy=entropy, hidden=store["hidden"])


def credit_coefficients(old: OldLogprobs, advantages: torch.Tensor, mask: torch.Tensor, cfg: CreditConfig):
    """Per-token coefficients [B, T] float32 (mean 1 over valid tokens, 0 on padding), and the
    DelTA stats (None for --credit none, whose coefficients are 1 on valid tokens)."""
    if cfg.credit == "none":
        return mask.float(), None
    res = delta_kernels.delta_coefficients(old.hidden, old.logp, advantages, mask, k=cfg.k, lam_min=cfg.lam_min,
                                           lam_max=cfg.lam_max, sketch_dim=cfg.sketch_dim, seed=cfg.sketch_seed,
                                           backend=cfg.backend)
    return res.coef.float(), res.stats


def policy_update(model, optimizer, rollout: Rollout, old: OldLogprobs, advantages: torch.Tensor,
                  coef: torch.Tensor, cfg: UpdateConfig, generator: torch.Generator, backend: str = "auto") -> Dict:
    """DAPO updates over shuffled mini-batches; returns the mean loss and clip metrics."""
    b = rollout.input_ids.shape[0]
    order = torch.randperm(b, generator=generator).to(rollout.input_ids.device)
    totals: Dict[str, float] = {}
    model.train()
    for idx in order.chunk(cfg.minibatches):
        mb = Rollout(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_len,
                     rollout.response_ids[idx], rollout.response_mask[idx])
        logits = _response_forward(model, mb)
        logp, _ = _token_logprobs(logits, mb.response_ids, cfg.temperature)
        loss, metrics = delta_kernels.clipped_surrogate_loss(
            logp.clamp(max=0.0), old.logp[idx], advantages[idx], mb.response_mask, coef=coef[idx],
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c, agg=cfg.agg, backend=backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        for name, val in [("loss", loss), ("grad_norm", grad_norm)] + list(metrics.items()):
            totals[name] = totals.get(name, 0.0) + float(val.detach()) / cfg.minibatches
    model.eval()
    return totals


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepResult:
    metrics: Dict[str, float]
    samples: List[Dict] = field(default_factory=list)


def rl_step(model, optimizer, tokenizer, task: AdditionTask, *, prompts_per_step: int, group_size: int,
            max_new_tokens: int, credit: CreditConfig, update: UpdateConfig, generator: torch.Generator,
            sampling_generator: Optional[torch.Generator] = None, keep_samples: int = 0) -> StepResult:
    """One full step; metrics include the time split (s) and the model forwards of each phase.

    ``generator`` (CPU) draws the prompts and the mini-batch order; ``sampling_generator`` (on the
    model's device; default ``generator``, which suits a CPU model) draws the response tokens."""
    device = next(model.parameters()).device
    timings: Dict[str, float] = {}
    counter = ForwardCounter(model)

    def timed(name, fn):
        _sync(device)
        t0 = time.perf_counter()
        n0 = counter.count
        out = fn()
        _sync(device)
        timings[f"time_{name}"] = time.perf_counter() - t0
        timings[f"forwards_{name}"] = counter.count - n0
        return out

    problems: List[Problem] = [p for p in task.sample(prompts_per_step, generator) for _ in range(group_size)]
    with counter:
        model.eval()
        rollout = timed("rollout", lambda: sample_responses(
            model, [tokenizer.encode(p.prompt) for p in problems], max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            generator=sampling_generator or generator, temperature=update.temperature))
        texts = [tokenizer.decode(r) for r in rollout.response_ids.tolist()]
        rewards = torch.tensor([task.reward(t, p) for t, p in zip(texts, problems)], device=device)
        adv = grpo_advantages(rewards, group_size)
        old = timed("old_logprob", lambda: old_logprob_pass(model, rollout, update.temperature))
        coef, stats = timed("coefficients", lambda: credit_coefficients(old, adv, rollout.response_mask, credit))
        upd = timed("update", lambda: policy_update(model, optimizer, rollout, old, adv, coef, update, generator,
                                                    credit.backend))
    mask = rollout.response_mask
    n_valid = mask.sum().clamp(min=1)
    metrics = dict(reward=float(rewards.mean()), accuracy=float((rewards == 1).float().mean()),
                   entropy=float((old.entropy * mask).sum() / n_valid),
                   response_len=float(mask.sum(1).float().mean()),
                   frac_zero_adv_groups=float((adv.view(-1, group_size) == 0).all(1).float().mean()),
                   coef_min=float(coef[mask].min()), coef_max=float(coef[mask].max()),
                   coef_std=float(coef[mask].std()) if int(mask.sum()) > 1 else 0.0, **upd, **timings)
    if stats is not None:
        metrics.update(delta_gamma_pos=float(stats.gamma_pos), delta_gamma_neg=float(stats.gamma_neg))
    metrics["forwards_total"] = sum(v for k, v in timings.items() if k.startswith("forwards_"))
    metrics["time_step"] = sum(v for k, v in timings.items() if k.startswith("time_"))
    samples = []
    informative = [i for i in range(len(problems)) if float(adv[i]) != 0.0]  # rows that carry a gradient
    for row in (informative or list(range(len(problems))))[:keep_samples]:
        n = int(mask[row].sum())
        samples.append(dict(prompt=problems[row].prompt, answer=problems[row].answer, response=texts[row],
                            reward=float(rewards[row]), advantage=float(adv[row]),
                            tokens=[tokenizer.token_text(x) for x in rollout.response_ids[row, :n].tolist()],
                            coef=[float(c) for c in coef[row, :n].tolist()]))
    return StepResult(metrics=metrics, samples=samples)
