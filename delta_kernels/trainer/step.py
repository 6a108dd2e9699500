"""One RL step: rollouts, reward, GRPO advantages, the old-log-prob pass (the model's body, then
the fused LM-head log-prob/sketch kernel: no logits), DelTA coefficients, and clipped-surrogate
updates straight from the hidden states and the LM head (no logits either).

Model forwards per step (forwards of the model's body, counted by ForwardCounter), identical
for --credit delta and --credit none:
    generation: one per generated token (KV cache), at most max_new_tokens;
    old-log-prob: 1 (DelTA's token vectors come from the same hidden states, no extra forward),
        or one per micro-batch with --micro-batch;
    update: one forward + backward per mini-batch;
    alignment (tasks with non-decisive tokens only): one forward + two backwards over one
        mini-batch's worth of rows, an instrumentation pass (see gradient_alignment).

Data parallel (a torch.distributed process group): each rank holds whole GRPO groups, the DelTA
statistics are all-reduced (global coefficients), and the gradients are averaged.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import delta_kernels

from .._backends import lm_head_backends
from .advantages import grpo_advantages
from ..credit.registry import in_loss_credit
from .credit_metrics import credit_auc, gradient_cosine, oracle_coefficients
from .distributed import average_gradients, global_token_share, reduce_metrics
from .model import body_of, lm_head_of
from .rollout import Rollout, sample_responses
from .task import Problem, decisive_mask


@dataclass
class OldLogprobs:
    logp: torch.Tensor     # [B, T] float32, log-prob (<= 0) of each response token under the behaviour policy
    entropy: torch.Tensor  # [B, T] float32, entropy of the next-token distribution (after temperature)
    hidden: Optional[torch.Tensor]   # [B, T, H] model dtype, hidden state entering the LM head for each
                                     # response token (None in micro-batches: not kept)
    vectors: Optional[torch.Tensor]  # [B, T, D] model dtype: v = (1 - p) h (D = H), or its sketch z = v @ R
                                     # (D = r); None in micro-batches: they are in ``accumulator``
    side_sums: Optional[torch.Tensor] = None  # [2, D] float32 (sum a+ v, sum a- v), or None without advantages
    accumulator: Optional[delta_kernels.DeltaAccumulator] = None  # micro-batched pass: one add per micro-batch
    head_vectors: Optional[tuple] = None  # --delta-vectors head: (u [B, T, r1], s [B, T, r2]) float32, the factors
                                          # of the LM-head gradient (head_gradient_sketch); then vectors is None


@dataclass
class CreditConfig:
    credit: str = "delta"          # a credit spec (delta_kernels.credit): "delta", "none", "fipo",
                                   # "delta*entropy", ...; or "oracle" (trainer only: the task's decisive tokens)
    k: int = 1
    lam_min: float = 0.8
    lam_max: float = 1.2
    sketch_dim: Optional[int] = None
    sketch_seed: int = 0
    backend: str = "auto"
    micro_batch: int = 0           # > 0: old-log-prob pass in micro-batches of this many responses
    vectors: str = "hidden"        # "hidden": v = (1 - p) h; "head": the LM-head gradient's factors (u, s)
    vocab_sketch_dim: Optional[int] = None  # "head": r1 (None: exact e_y - p); sketch_dim is r2
    oracle_floor: float = 0.1      # oracle credit: raw coefficient of the non-decisive tokens
    options: Dict[str, Dict] = field(default_factory=dict)  # the in-loss methods' options, by method name

    def uses_delta(self) -> bool:
        return "delta" in self.credit.split("*")

    def in_loss(self):
        """The spec of the methods computed in every loss call (fipo, entropy, ...), or None."""
        if self.credit == "oracle":
            return None
        spec = delta_kernels.credit_spec(self.credit, **self.options).of_kind(delta_kernels.credit.IN_LOSS)
        return spec if spec.methods else None


@dataclass
class UpdateConfig:
    minibatches: int = 4
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0
    agg: str = "token-mean"
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    compile: bool = False          # torch.compile the training step: phases A, B and C (C's backward with it)
    credit: Optional[object] = None   # CreditConfig.in_loss(): the credit computed in every loss call


_COMPILED: Dict[Callable, Callable] = {}


def step_phase(fn: Callable, compile: bool) -> Callable:
    """``fn``, or (--compile) its torch.compile with dynamic shapes, made once per function (each
    step's batch has its own response length: one recompile to dynamic shapes, not one per length)."""
    if not compile:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class ForwardCounter:
    """Counts forwards of the model's body (the transformer below the LM head) while active:
    the full model's forward runs it once, and so do the logit-free passes of this file."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.count, self._h = model, 0, None

    def __enter__(self):
        self._h = body_of(self.model).register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        self.count += 1

    def __exit__(self, *exc):
        self._h.remove()


def _response_columns(rollout: Rollout, width: int) -> slice:
    """Columns, in a frame holding the last ``width`` positions, of the states predicting the response."""
    p, t = rollout.prompt_len, rollout.response_ids.shape[1]
    offset = rollout.input_ids.shape[1] - width
    return slice(p - 1 - offset, p + t - 1 - offset)


def response_hidden(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """One forward of the model's body (the transformer without its LM head) over the rollout;
    returns the hidden states entering the LM head for the response tokens, [B, T, H] in the
    model's dtype (row b, column t predicts response token t). No logits are computed."""
    out = body_of(model)(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                         position_ids=rollout.position_ids, use_cache=False)
    hidden = out.last_hidden_state
    return hidden[:, _response_columns(rollout, hidden.shape[1])]


def fused_backend(backend: str) -> str:
    """The fused LM-head backend for a trainer --backend: the one named when it has the
    LM-head op, else "auto" (the registry's pick for the device)."""
    return backend if backend in lm_head_backends() else "auto"


@torch.no_grad()
def old_logprob_pass(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0,
                     advantages: Optional[torch.Tensor] = None, credit: Optional[CreditConfig] = None) -> OldLogprobs:
    """The behaviour policy's log-probs of the sampled tokens, their entropies and DelTA's token
    vectors (or their sketch) with their side sums, from ONE forward of the model's body followed
    by delta_kernels.fused_linear_logprob_sketch on the LM head: the [B, T, V] logits never exist.

    ``temperature`` is the sampling temperature (logits / temperature, as in sample_responses).
    ``advantages`` [B] float32 and ``credit`` (sketch width, seed, backend) feed the side sums;
    without them (or with credit "none") no side sums are computed."""
    credit = credit or CreditConfig()
    hidden = response_hidden(model, rollout)
    head = lm_head_of(model)
    head_mode = credit.uses_delta() and credit.vectors == "head"
    with_sums = advantages is not None and credit.uses_delta() and not head_mode
    logp, entropy, vectors, sums = delta_kernels.fused_linear_logprob_sketch(
        hidden, head.weight, rollout.response_ids, bias=head.bias, temperature=temperature,
        sketch_dim=credit.sketch_dim, seed=credit.sketch_seed, entropy=True,
        advantages=advantages if with_sums else None, mask=rollout.response_mask if with_sums else None,
        backend=fused_backend(credit.backend))
    if not head_mode:
        return OldLogprobs(logp=logp, entropy=entropy, hidden=hidden, vectors=vectors, side_sums=sums)
    factors = delta_kernels.head_gradient_sketch(
        hidden, head.weight, rollout.response_ids, vocab_sketch_dim=credit.vocab_sketch_dim,
        sketch_dim=credit.sketch_dim, seed=credit.sketch_seed, temperature=temperature, bias=head.bias,
        backend=fused_backend(credit.backend))
    return OldLogprobs(logp=logp, entropy=entropy, hidden=hidden, vectors=None, head_vectors=factors)


@torch.no_grad()
def old_logprob_micro_batches(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0,
                              credit: Optional[CreditConfig] = None, process_group=None) -> OldLogprobs:
    """old_logprob_pass in micro-batches of ``credit.micro_batch`` responses, as verl's actor and
    TRL run it: one forward of the body per micro-batch, and (credit "delta") each micro-batch's
    vectors added to a DeltaAccumulator without advantages (they come to credit_coefficients).
    Neither hidden states nor vectors are kept here: logp and entropy are [B, T] as before."""
    credit = credit or CreditConfig()
    acc = None
    if credit.uses_delta():
        acc = delta_kernels.DeltaAccumulator(k=credit.k, lam_min=credit.lam_min, lam_max=credit.lam_max,
                                             sketch_dim=None if credit.vectors == "head" else credit.sketch_dim,
                                             seed=credit.sketch_seed,
                                             process_group=process_group, backend=credit.backend)
    logps, entropies = [], []
    for rows in torch.arange(rollout.input_ids.shape[0]).split(credit.micro_batch):
        mb = Rollout(rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_len,
                     rollout.response_ids[rows], rollout.response_mask[rows])
        old = old_logprob_pass(model, mb, temperature, None, credit)
        if acc is not None:
            acc.add(vectors=old.vectors, head_vectors=old.head_vectors, logp=old.logp, mask=mb.response_mask)
        logps.append(old.logp)
        entropies.append(old.entropy)
    return OldLogprobs(logp=torch.cat(logps), entropy=torch.cat(entropies), hidden=None, vectors=None,
                       accumulator=acc)


def credit_coefficients(old: OldLogprobs, advantages: torch.Tensor, mask: torch.Tensor, cfg: CreditConfig,
                        process_group=None, decisive: Optional[torch.Tensor] = None):
    """Per-token coefficients [B, T] float32 (mean 1 over valid tokens, 0 on padding), and the
    DelTA stats (None without delta in the spec: coefficients 1 on valid tokens; the in-loss
    methods of the spec run in policy_loss, UpdateConfig.credit; None also for --credit oracle,
    which needs the task's ``decisive`` [B, T] bool). The vectors
    and side sums come from the old-log-prob pass (no pass over the hidden states here), or its
    accumulator is finalized (micro-batched pass; ``process_group`` was given to it there); with a
    ``process_group`` the statistics are those of the global batch over all ranks."""
    if cfg.credit == "oracle":
        if decisive is None:
            raise ValueError("credit 'oracle' needs the task's decisive positions (decisive=[B, T] bool)")
        return oracle_coefficients(decisive, mask, cfg.oracle_floor, process_group), None
    if not cfg.uses_delta():
        return mask.float(), None
    if old.accumulator is not None:  # micro-batched pass: the accumulator holds the vectors
        parts = old.accumulator.finalize(advantages)
        pred = torch.cat([r.stats.pred for r in parts])
        return torch.cat([r.coef for r in parts]).float(), dataclasses.replace(parts[0].stats, pred=pred)
    head = old.head_vectors is not None  # --delta-vectors head: the factors carry their own sketch widths
    res = delta_kernels.delta_coefficients(None, old.logp, advantages, mask, vectors=old.vectors,
                                           side_sums=old.side_sums, head_vectors=old.head_vectors, k=cfg.k,
                                           lam_min=cfg.lam_min, lam_max=cfg.lam_max,
                                           sketch_dim=None if head else cfg.sketch_dim, seed=cfg.sketch_seed,
                                           process_group=process_group, backend=cfg.backend)
    return res.coef.float(), res.stats


def policy_loss(model, mb: Rollout, old_logp: torch.Tensor, advantages: torch.Tensor, coef: torch.Tensor,
                cfg: UpdateConfig, backend: str = "auto", process_group=None, hidden: Optional[torch.Tensor] = None):
    """The weighted dual-clip DAPO loss of one mini-batch straight from the LM head:
    fused_linear_clipped_surrogate_loss on the body's hidden states (no [B, T, V] logits);
    gradients reach the model through the hidden states and the head weight (tied or not).
    The in-loss credit (cfg.credit) takes the log-probs and entropies computed there; the
    entropy quantile is over the ranks of ``process_group``. ``hidden``: the body's response
    hidden states of ``mb`` when already computed."""
    head = lm_head_of(model)
    hidden = response_hidden(model, mb) if hidden is None else hidden
    return delta_kernels.fused_linear_clipped_surrogate_loss(
        hidden, head.weight, mb.response_ids, old_logp, advantages, mb.response_mask, coef=coef, bias=head.bias,
        temperature=cfg.temperature, clip_low=cfg.clip_low, clip_high=cfg.clip_high, clip_c=cfg.clip_c,
        agg=cfg.agg, credit=cfg.credit, credit_group=process_group, backend=fused_backend(backend))


def policy_update(model, optimizer, rollout: Rollout, old: OldLogprobs, advantages: torch.Tensor,
                  coef: torch.Tensor, cfg: UpdateConfig, generator: torch.Generator, backend: str = "auto",
                  process_group=None) -> Dict:
    """DAPO updates over shuffled mini-batches; returns the mean loss and clip metrics.

    With a ``process_group`` (data parallel, each rank holding its own rollouts), each rank's
    token-mean loss is scaled by world * local tokens / global tokens and the gradients are
    averaged over the ranks before clipping and the optimizer step, so every rank takes the
    step of the token-mean loss over the global mini-batch and the parameters stay identical.
    The in-loss credit's metrics (cfg.credit: "fipo/weight_mean", ...) join the returned ones."""
    b = rollout.input_ids.shape[0]
    order = torch.randperm(b, generator=generator).to(rollout.input_ids.device)
    totals: Dict[str, float] = {}
    model.train()
    for idx in order.chunk(cfg.minibatches):
        mb = Rollout(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_len,
                     rollout.response_ids[idx], rollout.response_mask[idx])
        loss, metrics = step_phase(policy_loss, cfg.compile)(model, mb, old.logp[idx], advantages[idx], coef[idx],
                                                             cfg, backend, process_group)
        optimizer.zero_grad(set_to_none=True)
        if process_group is None:
            loss.backward()
        else:
            (loss * global_token_share(mb.response_mask, cfg.agg, process_group)).backward()
            average_gradients(model, process_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        for name, val in [("loss", loss), ("grad_norm", grad_norm)] + list(metrics.items()):
            v = float(val.detach())  # means over the mini-batches; *_min / *_max: min / max
            pick = min if name.endswith("_min") else max if name.endswith("_max") else None
            totals[name] = pick(totals.get(name, v), v) if pick else totals.get(name, 0.0) + v / cfg.minibatches
    model.eval()
    return totals


def credit_weights_at_rollout(coef: torch.Tensor, old: OldLogprobs, advantages: torch.Tensor, mask: torch.Tensor,
                              cfg: UpdateConfig, backend: str = "auto", process_group=None) -> torch.Tensor:
    """The per-token weight [B, T] an arm gives each token, as credit_auc ranks it: the
    coefficients times the in-loss methods' weights (cfg.credit: entropy, fipo) evaluated at the
    behaviour policy, 0 where they drop a row. FIPO's future-KL weights are 1 there (the
    policy has not moved yet), so its AUC at the rollout is 0.5; its weights form during the update."""
    if cfg.credit is None:
        return coef
    valid, weighted, _ = in_loss_credit(cfg.credit, old.logp, old.logp, advantages, mask, coef, old.entropy,
                                        cfg.clip_c, process_group, backend)
    return (coef if weighted is None else weighted) * valid


def gradient_alignment(model, rollout: Rollout, old: OldLogprobs, advantages: torch.Tensor, coef: torch.Tensor,
                       decisive: torch.Tensor, cfg: UpdateConfig, backend: str = "auto") -> Optional[float]:
    """Cosine between the arm's policy gradient (its loss with ``coef``) and the gradient of the
    decisive tokens alone (the same loss with coefficient 1 on decisive tokens, 0 elsewhere), at
    the current parameters, before clipping and the optimizer. Measured on the first
    rollout-rows / minibatches rows (whole GRPO groups of the step's first prompts): one body
    forward shared by both losses, two backwards (under data parallel: this rank's rows, local
    gradients). None when either gradient is zero."""
    rows = slice(0, max(rollout.input_ids.shape[0] // cfg.minibatches, 1))
    mb = Rollout(rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_len,
                 rollout.response_ids[rows], rollout.response_mask[rows])
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with torch.enable_grad():
        hidden = response_hidden(model, mb)
        grads = []
        uniform = dataclasses.replace(cfg, credit=None)  # the decisive tokens' own gradient: no in-loss credit
        for weights, loss_cfg in ((coef[rows], cfg), ((decisive[rows] & mb.response_mask).float(), uniform)):
            loss, _ = policy_loss(model, mb, old.logp[rows], advantages[rows], weights, loss_cfg, backend,
                                  hidden=hidden)
            grads.append(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    model.eval()
    return gradient_cosine(*grads)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepResult:
    metrics: Dict[str, float]
    samples: List[Dict] = field(default_factory=list)


def rl_step(model, optimizer, tokenizer, task, *, prompts_per_step: int, group_size: int,
            max_new_tokens: int, credit: CreditConfig, update: UpdateConfig, generator: torch.Generator,
            sampling_generator: Optional[torch.Generator] = None, keep_samples: int = 0,
            process_group=None, measure_alignment: bool = True) -> StepResult:
    """One full step; metrics include the time split (s) and the model forwards of each phase.

    ``generator`` (CPU) draws the prompts and the mini-batch order; ``sampling_generator`` (on the
    model's device; default ``generator``, which suits a CPU model) draws the response tokens.

    With a ``process_group`` of W ranks, ``prompts_per_step`` is the global count (a multiple of
    W): every rank draws the same prompts from ``generator`` (which therefore must be seeded alike
    on all ranks and stays in step) and keeps its own 1/W of them with all their group_size
    responses, so GRPO groups never straddle ranks; its ``sampling_generator`` must differ per
    rank. Metrics are then averaged over the ranks (coef_min / coef_max: min / max).

    ``task`` (task.py) scores the responses and marks their decisive tokens; on a task with
    free tokens (task.has_free_tokens) the metrics include credit_auc (credit_metrics.credit_auc
    of the coefficients), coef_decisive (the mean coefficient of decisive tokens), decisive_frac
    and grad_alignment (gradient_alignment, timed as the "alignment" phase, when
    ``measure_alignment``); NaN where a step has no pair to rank, a zero gradient or no
    alignment measured, so that every step (and rank) has the same keys."""
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

    drawn = task.sample(prompts_per_step, generator)
    if process_group is not None:
        import torch.distributed as dist
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if prompts_per_step % world:
            raise ValueError(f"prompts_per_step={prompts_per_step} is not a multiple of the {world} ranks")
        per_rank = prompts_per_step // world
        drawn = drawn[rank * per_rank:(rank + 1) * per_rank]
    problems: List[Problem] = [p for p in drawn for _ in range(group_size)]
    with counter:
        model.eval()
        rollout = timed("rollout", lambda: sample_responses(
            model, [tokenizer.encode(p.prompt) for p in problems], max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            generator=sampling_generator or generator, temperature=update.temperature))
        texts = [tokenizer.decode(r) for r in rollout.response_ids.tolist()]
        rewards = torch.tensor([task.reward(t, p) for t, p in zip(texts, problems)], device=device)
        mask = rollout.response_mask
        token_texts = [[tokenizer.token_text(x) for x in ids[:n]]
                       for ids, n in zip(rollout.response_ids.tolist(), mask.sum(1).tolist())]
        decisive = decisive_mask(task, token_texts, problems, tokenizer.token_text(tokenizer.eos_token_id),
                                 mask.shape[1], device)
        free_tokens = task.has_free_tokens  # credit_auc and grad_alignment are defined
        adv = grpo_advantages(rewards, group_size)
        if credit.micro_batch:
            old = timed("old_logprob", lambda: old_logprob_micro_batches(model, rollout, update.temperature, credit,
                                                                         process_group))
        else:
            old = timed("old_logprob", lambda: step_phase(old_logprob_pass, update.compile)(
                model, rollout, update.temperature, adv, credit))
        coef, stats = timed("coefficients", lambda: step_phase(credit_coefficients, update.compile)(
            old, adv, rollout.response_mask, credit, process_group, decisive))
        align = timed("alignment", lambda: gradient_alignment(model, rollout, old, adv, coef, decisive, update,
                                                              credit.backend) if measure_alignment else None) \
            if free_tokens else None
        upd = timed("update", lambda: policy_update(model, optimizer, rollout, old, adv, coef, update, generator,
                                                    credit.backend, process_group))
    n_valid = mask.sum().clamp(min=1)
    metrics = dict(reward=float(rewards.mean()), accuracy=float((rewards == 1).float().mean()),
                   entropy=float((old.entropy * mask).sum() / n_valid),
                   response_len=float(mask.sum(1).float().mean()),
                   frac_zero_adv_groups=float((adv.view(-1, group_size) == 0).all(1).float().mean()),
                   coef_min=float(coef[mask].min()), coef_max=float(coef[mask].max()),
                   coef_std=float(coef[mask].std()) if int(mask.sum()) > 1 else 0.0, **upd, **timings)
    if free_tokens:
        weights = credit_weights_at_rollout(coef, old, adv, mask, update, credit.backend, process_group)
        auc, nan = credit_auc(weights, decisive, mask), float("nan")
        dec = decisive & mask
        metrics.update(decisive_frac=float(dec.sum() / n_valid),
                       coef_decisive=float(coef[dec].mean()) if bool(dec.any()) else nan,
                       credit_auc=nan if auc is None else auc, grad_alignment=nan if align is None else align)
    if stats is not None:
        metrics.update(delta_gamma_pos=float(stats.gamma_pos), delta_gamma_neg=float(stats.gamma_neg))
    metrics["forwards_total"] = sum(v for k, v in timings.items() if k.startswith("forwards_"))
    metrics["time_step"] = sum(v for k, v in timings.items() if k.startswith("time_"))
    if process_group is not None:
        metrics = reduce_metrics(metrics, process_group)
    samples = []
    informative = [i for i in range(len(problems)) if float(adv[i]) != 0.0]  # rows that carry a gradient
    for row in (informative or list(range(len(problems))))[:keep_samples]:
        n = int(mask[row].sum())
        samples.append(dict(prompt=problems[row].prompt, answer=problems[row].answer, response=texts[row],
                            reward=float(rewards[row]), advantage=float(adv[row]),
                            tokens=[tokenizer.token_text(x) for x in rollout.response_ids[row, :n].tolist()],
                            coef=[float(c) for c in coef[row, :n].tolist()],
                            decisive=[bool(d) for d in decisive[row, :n].tolist()]))
    return StepResult(metrics=metrics, samples=samples)
