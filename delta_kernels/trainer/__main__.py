"""CLI: ``python -m delta_kernels.trainer`` / ``delta-train``. See --help."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .._optional import MissingExtra
from ..aggregation import AGG_MODES
from .config import BACKENDS, CREDIT_METHODS, DELTA_VECTORS, TrainerConfig, option_flags, validate
from .task import TASKS


def _flag_type(default):
    """argparse type of an option flag: its default's (true/false words for a bool)."""
    if isinstance(default, bool):
        return lambda text: {"true": True, "false": False}[text.lower()]
    return type(default) if default is not None else float


def build_parser() -> argparse.ArgumentParser:
    d = TrainerConfig()
    p = argparse.ArgumentParser(
        prog="delta-train",
        description="Reference RLVR loop (GRPO advantages, DAPO loss) with DelTA token credit assignment. "
                    "Default: an embedded Qwen3-architecture model and 2-digit addition, warm-started then "
                    "trained with RL on the CPU in a few minutes. Data parallel: torchrun --nproc_per_node=N -m "
                    "delta_kernels.trainer ... (--prompts-per-step is the global count, split between the ranks). "
                    "'delta-train compare --help': credit arms x seeds, paired by seed.")
    a = p.add_argument
    a("--credit", default=d.credit,
      help=f"token credit: one of {', '.join(CREDIT_METHODS)}, none (plain DAPO), or a product such as "
           "delta*entropy (delta_kernels.credit); delta is computed before the update, the others in every loss call; "
           "or (trainer only) oracle: 1 on the task's decisive tokens, --oracle-floor elsewhere, mean 1")
    a("--oracle-floor", type=float, default=d.oracle_floor, help="oracle credit of the non-decisive tokens")
    for name, f in option_flags():
        a(f"--{name}-{f.name.replace('_', '-')}", dest=f"{name}__{f.name}", type=_flag_type(f.default),
          default=argparse.SUPPRESS, help=f"{name} option {f.name} (default {f.default}; only with --credit using {name})")
    a("--k", type=int, default=d.k, help="DelTA refinement steps (>= 0)")
    a("--lam-min", type=float, default=d.lam_min)
    a("--lam-max", type=float, default=d.lam_max)
    a("--sketch-dim", type=int, default=d.sketch_dim,
      help="sketch width r (default: exact vectors); with --delta-vectors head, r2, the width of S2^T h")
    a("--delta-vectors", choices=DELTA_VECTORS, default=d.delta_vectors,
      help="DelTA's token vectors: hidden, (1 - p) h (the LM-head row of the sampled token); head, the whole "
           "LM-head gradient (e_y - p) h^T, kept as two factors (delta_kernels.head_gradient_sketch)")
    a("--vocab-sketch-dim", type=int, default=d.vocab_sketch_dim,
      help="with --delta-vectors head: r1, the width of S1^T (e_y - p) (default: exact, [tokens x vocab])")
    a("--backend", choices=BACKENDS, default=d.backend, help="delta_kernels backend of coefficients and loss")
    a("--micro-batch", type=int, default=d.micro_batch,
      help="old-log-prob pass in micro-batches of this many responses, coefficients from a DeltaAccumulator "
           "(0: one pass)")
    a("--seed", type=int, default=d.seed)
    a("--steps", type=int, default=d.steps, help="RL steps")
    a("--device", choices=("cpu", "cuda"), default=d.device)
    a("--threads", type=int, default=d.threads, help="torch CPU threads")
    a("--model", default=d.model, help="local causal-LM checkpoint directory (with its tokenizer)")
    a("--out", default=d.out, help="output directory (default runs/<timestamp>)")
    a("--prompts-per-step", type=int, default=d.prompts_per_step,
      help="prompts per RL step over all ranks (a multiple of the number of ranks)")
    a("--group-size", type=int, default=d.group_size, help="responses per prompt (G)")
    a("--minibatches", type=int, default=d.minibatches, help="policy updates per step")
    a("--lr", type=float, default=d.lr)
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear LR warm-up of the RL phase")
    a("--temperature", type=float, default=d.temperature)
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient-norm clipping of each update")
    a("--agg", choices=AGG_MODES, default=d.agg, help="loss aggregation over tokens (token-sum: no normaliser)")
    a("--max-new-tokens", type=int, default=d.max_new_tokens, help="0: answer width + 1")
    add_task_arguments(p, d)
    a("--eval-every", type=int, default=d.eval_every, help="held-out greedy accuracy every N RL steps (0: off)")
    a("--final-evals", type=int, default=d.final_evals,
      help="final held-out accuracy = mean of the last N held-out evaluations")
    a("--align-every", type=int, default=d.align_every,
      help="gradient alignment (arm's policy gradient vs the decisive tokens' alone) every N steps (0: off)")
    a("--hidden-size", type=int, default=d.hidden_size)
    a("--num-layers", type=int, default=d.num_layers)
    a("--num-heads", type=int, default=d.num_heads)
    a("--sft-max-steps", type=int, default=d.sft_max_steps,
      help="supervised warm-start steps at most (default 600 for the embedded model, 0 with --model)")
    a("--sft-target-accuracy", type=float, default=d.sft_target_accuracy,
      help="stop the warm start once probe accuracy reaches this")
    a("--warm-start-cache", default=d.warm_start_cache,
      help="file of the warm-started model: loaded when it exists (the warm start is skipped), else written")
    a("--warm-start-seed", type=int, default=d.warm_start_seed,
      help="seed of the model's init and warm start (default --seed); RL then draws from a stream seeded with --seed")
    a("--html-samples", type=int, default=d.html_samples)
    a("--compile", action="store_true",
      help="torch.compile the training step: the old-log-prob pass, the coefficients and the loss with its "
           "backward (dynamic shapes; the first steps pay the compilation)")
    a("--no-progress", dest="progress", action="store_false",
      help="no progress bar (on a terminal) or progress lines (under a pipe or CI); the summary is still printed")
    return p


def add_task_arguments(p: argparse.ArgumentParser, d: TrainerConfig) -> None:
    """--task and its options (shared with ``delta-train compare``)."""
    a = p.add_argument
    a("--task", choices=tuple(TASKS), default=d.task,
      help="addition: every token decisive; sparse: L free filler tokens, then '|' and the answer; pathstar: "
           "choose the arm ending at the target, then copy it (see delta_kernels/trainer/task.py)")
    a("--digits", type=int, default=d.digits, help="operand digits (addition, sparse)")
    a("--filler-len", type=int, default=d.filler_len, help="sparse: free filler tokens L before the answer")
    a("--filler-chars", type=int, default=d.filler_chars, help="sparse: filler alphabet size")
    a("--branches", type=int, default=d.branches, help="pathstar: number of arms")
    a("--path-len", type=int, default=d.path_len, help="pathstar: digits per arm")
    a("--heldout-size", type=int, default=d.heldout_size)


def parse_config(argv: Optional[List[str]] = None) -> TrainerConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    options = {}
    for key in [k for k in args if "__" in k]:
        name, opt = key.split("__")
        options.setdefault(name, {})[opt] = args.pop(key)
    cfg = TrainerConfig(**args, credit_options=options)
    try:
        validate(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    """The CLI: ``delta-train [options]`` trains once, ``delta-train compare [options]`` runs
    credit arms x seeds (compare.py). --help and argument errors need only the base install
    (config.py and compare.py import no extra); a run without the 'trainer' extra ends at once,
    before any work, with one line on stderr that says what to install (exit status 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            from .compare import main as compare_main
            return compare_main(argv[1:])
        cfg = parse_config(argv)
        from .loop import require_trainer_extra, run
        require_trainer_extra()
    except MissingExtra as e:
        print(f"delta-train: {e}", file=sys.stderr)
        return 1
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
