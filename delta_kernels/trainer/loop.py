"""A whole run: build task, tokenizer and model, warm start, RL steps, reports."""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Dict, List, Optional

import torch

from .._backends import describe_backends
from .._optional import require
from .config import TrainerConfig, validate
from .distributed import (broadcast_parameters, finish, gather_objects, init_from_env, parameter_checksum,
                          sampling_seed, shutdown)
from .evaluate import greedy_accuracy
from .model import build_default_model, count_parameters, embedded_size, load_pretrained
from .progress import StepProgress
from .report import MetricsLog, format_summary, plot_curves, write_responses_html
from .step import CreditConfig, UpdateConfig, rl_step
from .task import build_task
from .tokenizer import CharTokenizer, HFTokenizerAdapter
from .warm_start import WarmStartConfig, supervised_warm_start

TIME_KEYS = ("rollout", "old_logprob", "coefficients", "update")
EXTRA_MODULES = ("transformers", "matplotlib", "tqdm")  # the 'trainer' extra


def require_trainer_extra() -> None:
    """Raise delta_kernels._optional.MissingExtra (one line naming the extra) when a module of the
    'trainer' extra is missing, before a run spends minutes and fails at its plots."""
    for name in EXTRA_MODULES:
        require(name, "trainer")


def _is_timing(key: str) -> bool:
    return key.startswith("time_")


def build_policy(cfg: TrainerConfig, device: torch.device, task=None):
    """(model, tokenizer, model name) for the config; the embedded model's character tokenizer
    has the task's alphabet and its positions cover the task's prompts and responses."""
    if cfg.model is not None:
        model, hf_tok = load_pretrained(cfg.model, device)
        return model, HFTokenizerAdapter(hf_tok), cfg.model
    task = task or build_task(cfg)
    tok = CharTokenizer(task.chars)
    seed = cfg.seed if cfg.warm_start_seed is None else cfg.warm_start_seed
    longest = max(len(p.prompt) for p in task.heldout) + 2 + max(task.max_response_chars() + 1, cfg.max_new_tokens)
    size = embedded_size(cfg.hidden_size, cfg.num_layers, cfg.num_heads, max_positions=max(64, longest))
    model, arch = build_default_model(tok.vocab_size, size, seed, tok.pad_token_id, tok.bos_token_id,
                                      tok.eos_token_id)
    name = f"embedded {arch} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, char tokenizer)"
    return model.to(device), tok, name


def run(cfg: TrainerConfig) -> Dict:
    """Train with ``cfg``; writes metrics.jsonl, curves.png, responses.html and summary.json
    into cfg.out and returns the summary.

    Under torchrun (WORLD_SIZE > 1) every rank runs this: the process group is initialised from
    the environment, each rank takes prompts_per_step / world of each step's prompts (whole GRPO
    groups), DelTA's statistics and the gradients are reduced over the ranks, and only rank 0
    evaluates, writes the outputs and shows the progress bar. Every rank returns the summary."""
    validate(cfg)
    require_trainer_extra()
    device = torch.device(cfg.device)
    ctx = init_from_env(device)
    try:
        summary = _run(cfg, ctx, device)
        finish(ctx)
        return summary
    finally:
        shutdown(ctx)


def _run(cfg: TrainerConfig, ctx, device: torch.device) -> Dict:
    t_start = time.perf_counter()
    if ctx.is_main:
        print(f"delta-train: --backend {cfg.backend} on {cfg.device}; backends: {describe_backends()}", flush=True)
    if cfg.prompts_per_step % ctx.world:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {ctx.world} ranks")
    rank_responses = cfg.prompts_per_step // ctx.world * cfg.group_size
    if cfg.minibatches > rank_responses:
        raise ValueError(f"--minibatches {cfg.minibatches} exceeds the {rank_responses} responses of a rank's step")
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = None
    if ctx.is_main:
        out = cfg.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        os.makedirs(out, exist_ok=True)
    out = gather_objects(out, ctx)[0]  # rank 0's directory, named in every rank's summary

    task = build_task(cfg)
    model, tok, model_name = build_policy(cfg, device, task)
    model.eval()
    max_new = cfg.max_new_tokens or task.max_response_chars() + 1
    warm_seed = cfg.seed if cfg.warm_start_seed is None else cfg.warm_start_seed
    gen = torch.Generator().manual_seed(warm_seed)  # prompts, mini-batch order (CPU; in step on every rank)
    if ctx.world > 1:  # each rank samples its responses from its own stream
        sampling_gen = torch.Generator(device=device).manual_seed(sampling_seed(cfg.seed, ctx.rank))
    else:
        sampling_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed)

    if cfg.warm_start_cache and ctx.world > 1:
        raise ValueError("--warm-start-cache: not supported under torchrun (one process only)")
    cached = load_warm_start(cfg, model, gen) if cfg.warm_start_cache else None
    if cached is not None:
        warm, time_warm, acc_before = cached["warm"], cached["time_warm_start_s"], cached["accuracy_before_rl"]
    else:
        t0 = time.perf_counter()
        sft_steps = cfg.sft_max_steps if cfg.sft_max_steps is not None else (0 if cfg.model else 600)
        warm = dict(steps=0, history=[])
        if sft_steps > 0:
            warm = supervised_warm_start(model, tok, task, WarmStartConfig(
                max_steps=sft_steps, target_accuracy=cfg.sft_target_accuracy, batch_size=cfg.sft_batch_size,
                lr=cfg.sft_lr), gen, max_new)
        if ctx.world > 1:  # the warm start ran identically on every rank; make that exact
            broadcast_parameters(model, ctx.group)
        time_warm = time.perf_counter() - t0
        acc_before = (greedy_accuracy(model, tok, task.heldout, max_new, reward=task.reward) if ctx.is_main
                      else float("nan"))
        if cfg.warm_start_cache:
            save_warm_start(cfg, model, gen, dict(warm=warm, time_warm_start_s=time_warm,
                                                  accuracy_before_rl=acc_before))
    if cfg.warm_start_seed is not None:  # a shared warm start: RL's own stream
        gen.manual_seed(cfg.seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    credit = CreditConfig(credit=cfg.credit, k=cfg.k, lam_min=cfg.lam_min, lam_max=cfg.lam_max,
                          sketch_dim=cfg.sketch_dim, sketch_seed=cfg.seed, backend=cfg.backend,
                          micro_batch=cfg.micro_batch, vectors=cfg.delta_vectors,
                          vocab_sketch_dim=cfg.vocab_sketch_dim, oracle_floor=cfg.oracle_floor,
                          options=cfg.credit_options)
    update = UpdateConfig(minibatches=cfg.minibatches, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                          clip_c=cfg.clip_c, max_grad_norm=cfg.max_grad_norm, temperature=cfg.temperature,
                          agg=cfg.agg, compile=cfg.compile, credit=credit.in_loss())
    log = MetricsLog(out if ctx.is_main else None)
    samples = []
    sample_steps = {0, cfg.steps // 2, cfg.steps - 1}
    per_sample = max(cfg.html_samples // len(sample_steps), 1)
    progress = StepProgress(cfg.steps, f"RL ({cfg.credit})", enabled=cfg.progress and ctx.is_main)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        res = rl_step(model, optimizer, tok, task, prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                      max_new_tokens=max_new, credit=credit, update=update, generator=gen,
                      sampling_generator=sampling_gen,
                      keep_samples=per_sample if step in sample_steps else 0,
                      process_group=ctx.group,
                      measure_alignment=bool(cfg.align_every) and step % cfg.align_every == 0)
        sched.step()
        row = dict(step=step, lr=sched.get_last_lr()[0], **res.metrics)
        if ctx.is_main and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
            row["heldout_accuracy"] = greedy_accuracy(model, tok, task.heldout, max_new, reward=task.reward)
        log.append(row)
        samples += [dict(s, step=step) for s in res.samples]
        progress.update(step, reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}",
                        ent=f"{row['entropy']:.3f}", step_s=f"{row['time_step']:.2f}")
    progress.close()
    time_rl = time.perf_counter() - t0
    acc_after = log.rows[-1].get("heldout_accuracy", float("nan"))
    checksums = gather_objects(parameter_checksum(model), ctx)

    rows = log.rows
    title = (f"DelTA trainer, task={cfg.task}, credit={cfg.credit}, seed={cfg.seed}"
             + (f", {ctx.world} ranks" if ctx.world > 1 else ""))
    if ctx.is_main:
        plot_curves(rows, os.path.join(out, "curves.png"), title, heldout_before=acc_before)
        write_responses_html(samples, os.path.join(out, "responses.html"), title)
    forwards = {k[len("forwards_"):]: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith("forwards_")}
    summary = dict(
        credit=cfg.credit, seed=cfg.seed, model=model_name, parameters=count_parameters(model), device=cfg.device,
        steps=cfg.steps, heldout_size=len(task.heldout), accuracy_before_rl=acc_before, accuracy_after_rl=acc_after,
        warm_start_steps=warm["steps"], warm_start_history=warm["history"], time_warm_start_s=time_warm,
        time_rl_s=time_rl, time_split={k: sum(r[f"time_{k}"] for r in rows) for k in TIME_KEYS},
        forwards_per_step=forwards, out=out, config=vars(cfg).copy(), world_size=ctx.world,
        parameter_checksum=checksums[ctx.rank], parameter_checksums_by_rank=checksums, task=cfg.task,
        **outcome_metrics(rows, acc_before, cfg.final_evals))
    summary["time_total_s"] = time.perf_counter() - t_start
    if ctx.is_main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        print(format_summary(summary))
    return summary


def _nanmean(xs: List[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def outcome_metrics(rows: List[Dict], acc_before: float, final_evals: int) -> Dict:
    """What a comparison reads from a run (compare.py): the held-out curve [[step, accuracy]]
    (step 0 = before RL, s = after s steps), final_heldout_accuracy (mean of the last
    ``final_evals`` held-out evaluations after RL), mean_train_reward (sampled reward averaged
    over all steps) and the per-step means of credit_auc, grad_alignment and coef_decisive (None
    on tasks where every token is decisive)."""
    curve = [[0, acc_before]] + [[r["step"] + 1, r["heldout_accuracy"]] for r in rows if "heldout_accuracy" in r]
    late = curve[1:][-final_evals:]
    return dict(heldout_curve=curve, final_heldout_accuracy=sum(a for _, a in late) / len(late) if late else None,
                final_heldout_steps=[s for s, _ in late],
                mean_train_reward=sum(r["reward"] for r in rows) / len(rows),
                **{f"{k}_mean": _nanmean([r.get(k) for r in rows]) for k in ("credit_auc", "grad_alignment",
                                                                             "coef_decisive")})


def _cache_key(cfg: TrainerConfig) -> Dict:
    """The options a warm start depends on (a cache written under other options is refused)."""
    keep = ("task", "digits", "filler_len", "filler_chars", "branches", "path_len", "heldout_size",
            "model", "hidden_size", "num_layers", "num_heads", "max_new_tokens", "sft_max_steps",
            "sft_target_accuracy", "sft_lr", "sft_batch_size", "device")
    return dict({k: getattr(cfg, k) for k in keep},
                seed=cfg.seed if cfg.warm_start_seed is None else cfg.warm_start_seed)


def load_warm_start(cfg: TrainerConfig, model, gen: torch.Generator) -> Optional[Dict]:
    """Restore the warm-started weights and the prompt generator's state from
    cfg.warm_start_cache, so that the run goes on exactly as if it had warmed up itself; None
    when the file does not exist yet."""
    if not os.path.exists(cfg.warm_start_cache):
        return None
    state = torch.load(cfg.warm_start_cache, map_location="cpu", weights_only=False)
    key = _cache_key(cfg)
    if state["key"] != key:
        diff = sorted(k for k in set(state["key"]) | set(key) if state["key"].get(k) != key.get(k))
        raise ValueError(f"--warm-start-cache: {cfg.warm_start_cache} was written with other settings "
                         f"({', '.join(diff)})")
    model.load_state_dict(state["model"])
    gen.set_state(state["generator"])
    return state["info"]


def save_warm_start(cfg: TrainerConfig, model, gen: torch.Generator, info: Dict) -> None:
    """Write the cache atomically (a concurrent reader sees the whole file or none)."""
    path = cfg.warm_start_cache
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(dict(key=_cache_key(cfg), model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    generator=gen.get_state(), info=info), tmp)
    os.replace(tmp, path)


def deterministic_view(rows, drop=_is_timing):
    """Rows without the wall-clock fields (what must match between two runs of one seed)."""
    return [{k: v for k, v in r.items() if not drop(k)} for r in rows]
