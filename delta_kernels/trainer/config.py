"""Every knob of a trainer run, with the defaults of the embedded run, and their checks."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from .._backends import RUNS_HERE, backend_report, names
from ..aggregation import AGG_MODES
from ..credit import BEFORE_UPDATE, credit_spec, method, methods
from .task import TASKS

CREDIT_METHODS = methods()  # the registry's names; --credit takes one, "none", or a product "delta*entropy"
DELTA_VECTORS = ("hidden", "head")
TRAINER_CREDITS = ("oracle",)  # credit only the trainer can compute (it needs the task's decisive tokens)
BACKENDS = names()


@dataclass
class TrainerConfig:
    # credit assignment
    credit: str = "delta"              # a credit spec: "delta", "fipo", "entropy", "none", or a product
                                       # "delta*entropy"; or "oracle" (1 on the task's decisive tokens, oracle_floor elsewhere)
    credit_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # in-loss methods' options given as
                                       # flags --<method>-<option>: {"fipo": {"decay_rate": 64.0}, ...}
    oracle_floor: float = 0.1
    k: int = 1                         # DelTA refinement steps
    lam_min: float = 0.8
    lam_max: float = 1.2
    sketch_dim: Optional[int] = None   # None: exact token vectors; r: sketch of r columns (head: r2, of h)
    delta_vectors: str = "hidden"      # DelTA's token vectors: "hidden" (1 - p) h, or "head": the LM-head gradient
    vocab_sketch_dim: Optional[int] = None  # head: r1, the vocabulary sketch of e_y - p (None: exact, [N, V])
    backend: str = "auto"              # delta_kernels backend for coefficients and loss
    micro_batch: int = 0               # 0: one old-log-prob pass; n: micro-batches of n responses (DeltaAccumulator)
    # run
    seed: int = 0
    steps: int = 400
    device: str = "cpu"
    threads: int = 1                   # torch CPU threads (the tiny default model gains nothing from more)
    out: Optional[str] = None          # default runs/<timestamp>
    progress: bool = True
    html_samples: int = 12
    compile: bool = False              # torch.compile the training step (old-log-prob pass, coefficients, loss)
    # model
    model: Optional[str] = None        # local checkpoint; None builds the embedded Qwen3-architecture model
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    # task
    task: str = "addition"             # a name of task.TASKS
    digits: int = 2                    # addition, sparse: operand digits
    filler_len: int = 16               # sparse: free filler tokens before "|" and the answer
    filler_chars: int = 8              # sparse: filler alphabet size
    branches: int = 3                  # pathstar: arms
    path_len: int = 6                  # pathstar: digits per arm
    heldout_size: int = 256
    eval_every: int = 25               # held-out greedy accuracy every N RL steps (0: before/after only)
    final_evals: int = 3               # final_heldout_accuracy: mean of the last N held-out evaluations
    align_every: int = 5               # gradient alignment every N RL steps (tasks with free tokens; 0: off)
    max_new_tokens: int = 0            # 0: answer width + 1 (eos)
    # RL (DAPO settings)
    prompts_per_step: int = 32
    group_size: int = 8
    minibatches: int = 4
    lr: float = 3e-4
    warmup_steps: int = 5
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    agg: str = "token-mean"            # loss aggregation (delta_kernels.aggregation.AGG_MODES)
    # supervised warm start (embedded model only unless sft_max_steps is set)
    sft_max_steps: Optional[int] = None   # None: 600 for the embedded model, 0 with --model
    sft_target_accuracy: float = 0.3
    sft_lr: float = 3e-3
    sft_batch_size: int = 128
    warm_start_cache: Optional[str] = None  # file: load the warm-started model if there, else write it
    warm_start_seed: Optional[int] = None   # seed of model init + warm start (None: --seed); when set, RL
                                            # draws its prompts and samples from a stream seeded with --seed


def validate(cfg: TrainerConfig) -> None:
    """Raise ValueError / FileNotFoundError with a message naming the bad option."""
    if cfg.credit not in TRAINER_CREDITS:
        try:
            credit_spec(cfg.credit, **cfg.credit_options)
        except ValueError as e:
            raise ValueError(f"--credit {cfg.credit}: {e}") from None
    if cfg.task not in TASKS:
        raise ValueError(f"--task: unknown task {cfg.task!r}; expected one of {', '.join(TASKS)}")
    if not 0 <= cfg.oracle_floor <= 1:
        raise ValueError(f"--oracle-floor: expected 0..1, got {cfg.oracle_floor}")
    if cfg.align_every < 0:
        raise ValueError(f"--align-every: must be >= 0, got {cfg.align_every}")
    if cfg.final_evals < 1:
        raise ValueError(f"--final-evals: must be >= 1, got {cfg.final_evals}")
    if cfg.max_grad_norm <= 0:
        raise ValueError(f"--max-grad-norm: must be > 0, got {cfg.max_grad_norm}")
    if cfg.agg not in AGG_MODES:
        raise ValueError(f"--agg: unknown aggregation {cfg.agg!r}; expected one of {', '.join(AGG_MODES)}")
    if cfg.k < 0:
        raise ValueError(f"--k: refinement steps must be >= 0, got {cfg.k}")
    if not cfg.lam_min <= cfg.lam_max:
        raise ValueError(f"--lam-min {cfg.lam_min} must be <= --lam-max {cfg.lam_max}")
    if cfg.lam_min < 0:
        raise ValueError(f"--lam-min must be >= 0, got {cfg.lam_min}")
    if cfg.sketch_dim is not None and cfg.sketch_dim < 1:
        raise ValueError(f"--sketch-dim must be >= 1, got {cfg.sketch_dim}")
    if cfg.delta_vectors not in DELTA_VECTORS:
        raise ValueError(f"--delta-vectors: expected one of {', '.join(DELTA_VECTORS)}, got {cfg.delta_vectors!r}")
    if cfg.vocab_sketch_dim is not None and cfg.vocab_sketch_dim < 1:
        raise ValueError(f"--vocab-sketch-dim must be >= 1, got {cfg.vocab_sketch_dim}")
    if cfg.micro_batch < 0:
        raise ValueError(f"--micro-batch: must be >= 0 (0: no micro-batches), got {cfg.micro_batch}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend: unknown backend {cfg.backend!r}; expected one of {', '.join(BACKENDS)}")
    why = RUNS_HERE if cfg.backend == "auto" else backend_report()[cfg.backend]
    if why != RUNS_HERE:
        raise ValueError(f"--backend {cfg.backend}: cannot run here: {why}")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
    if cfg.model is not None and not os.path.exists(cfg.model):
        raise FileNotFoundError(f"--model: path {cfg.model!r} does not exist (pass a local checkpoint directory; "
                                "nothing is downloaded)")
    for name in ("steps", "prompts_per_step", "minibatches", "threads", "heldout_size", "hidden_size",
                 "num_layers", "num_heads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        raise ValueError(f"--group-size: GRPO needs at least 2 responses per prompt, got {cfg.group_size}")
    if cfg.minibatches > cfg.prompts_per_step * cfg.group_size:
        raise ValueError(f"--minibatches {cfg.minibatches} exceeds the {cfg.prompts_per_step * cfg.group_size} "
                         "responses of a step")
    if cfg.lr <= 0 or cfg.sft_lr <= 0:
        raise ValueError("--lr and --sft-lr must be > 0")
    if cfg.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {cfg.eval_every}")
    if cfg.warmup_steps < 0 or cfg.max_new_tokens < 0 or (cfg.sft_max_steps or 0) < 0:
        raise ValueError("--warmup-steps, --max-new-tokens and --sft-max-steps must be >= 0")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 <= cfg.clip_low < 1 or cfg.clip_high < 0 or cfg.clip_c <= 1:
        raise ValueError("clip ranges: need 0 <= --clip-low < 1, --clip-high >= 0, --clip-c > 1")


def option_flags():
    """(method, option field) of every registered method computed in the loss: the trainer's flag
    --<method>-<option> (DelTA's options are the trainer's own --k, --lam-min, ...)."""
    return [(m, f) for m in CREDIT_METHODS if method(m).kind != BEFORE_UPDATE for f in fields(method(m).options)]


def field_names():
    return [f.name for f in fields(TrainerConfig)]
