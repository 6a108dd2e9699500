"""Step time of the reference trainer with its training step compiled (--compile) and eager.

Both run in ONE process on the SAME inputs, as bench_trainer_overhead.py does: before each step the
model, optimizer and generator states are snapshotted, the step runs in one mode, the states are
restored and it runs in the other (order alternating). The first ``--warmup`` pairs (compilation,
and the recompile to dynamic shapes) are not measured. Reported: median step time per mode, the
phases, and the compiled / eager ratio.

    python benchmarks/bench_compile_step.py [--steps 10] [--warmup 3] [--backend inductor]

Writes benchmarks/results/compile_step_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from delta_kernels.trainer import step as step_module  # noqa: E402
from delta_kernels.trainer.config import TrainerConfig  # noqa: E402
from delta_kernels.trainer.model import build_default_model, count_parameters, embedded_size  # noqa: E402
from delta_kernels.trainer.step import CreditConfig, UpdateConfig, rl_step  # noqa: E402
from delta_kernels.trainer.task import AdditionTask  # noqa: E402
from delta_kernels.trainer.tokenizer import CharTokenizer  # noqa: E402

from bench_info import git_commit, machine_name  # noqa: E402

PHASES = ("rollout", "old_logprob", "coefficients", "update")
MODES = ("eager", "compiled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="measured step pairs")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured step pairs first (compilation)")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--credit-backend", default="auto", help="delta_kernels backend of coefficients and loss")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    torch.set_num_threads(1)
    for fn in (step_module.old_logprob_pass, step_module.credit_coefficients, step_module.policy_loss):
        step_module._COMPILED[fn] = torch.compile(fn, dynamic=True, backend=args.backend)  # as step_phase, backend
    commit = git_commit()
    tok, task = CharTokenizer(), AdditionTask()
    d = TrainerConfig()  # the trainer's default embedded model
    size = embedded_size(d.hidden_size, d.num_layers, d.num_heads)
    model, arch = build_default_model(tok.vocab_size, size, 0, tok.pad_token_id, tok.bos_token_id,
                                      tok.eos_token_id)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    credit = CreditConfig(backend=args.credit_backend)
    times = {m: [] for m in MODES}
    phases = {m: {p: [] for p in PHASES} for m in MODES}
    t_first = {}
    for i in range(args.warmup + args.steps):
        snap = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), gen.get_state())
        for j, mode in enumerate(MODES if i % 2 == 0 else MODES[::-1]):
            if j == 1:
                model.load_state_dict(snap[0])
                opt.load_state_dict(snap[1])
                gen.set_state(snap[2])
            t0 = time.perf_counter()
            res = rl_step(model, opt, tok, task, prompts_per_step=args.prompts_per_step, group_size=8,
                          max_new_tokens=4, credit=credit, update=UpdateConfig(compile=mode == "compiled"),
                          generator=gen)
            t_first.setdefault(mode, time.perf_counter() - t0)
            if i >= args.warmup:
                times[mode].append(res.metrics["time_step"])
                for p in PHASES:
                    phases[mode][p].append(res.metrics[f"time_{p}"])
    med = {m: statistics.median(v) for m, v in times.items()}
    result = dict(machine=machine_name(torch.device("cpu")), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  commit=commit, torch=torch.__version__, threads=1, model=arch, parameters=count_parameters(model),
                  responses_per_step=args.prompts_per_step * 8, compile_backend=args.backend,
                  credit_backend=args.credit_backend, measured_steps=args.steps, warmup_steps=args.warmup,
                  first_step_s=t_first, median_step_s=med, compiled_over_eager=med["compiled"] / med["eager"],
                  median_phase_s={m: {p: statistics.median(v) for p, v in ph.items()} for m, ph in phases.items()},
                  step_times_s=times)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compile_step_{result['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Trainer step, compiled (--compile, backend {args.backend}) and eager ({result['machine']})", "",
          f"{result['date']}, commit {commit}, torch {result['torch']}, 1 thread; {arch} model, "
          f"{result['parameters']:,} parameters, {result['responses_per_step']} responses per step, credit delta "
          f"(backend {args.credit_backend}), {args.steps} measured step pairs on identical inputs after "
          f"{args.warmup} warm-up pairs.", "",
          "| mode | median step (s) | rollout | old-log-prob | coefficients | update | first step (s) |",
          "|---|---|---|---|---|---|---|"]
    for m in MODES:
        ph = result["median_phase_s"][m]
        md.append(f"| {m} | {med[m]:.4f} | {ph['rollout']:.4f} | {ph['old_logprob']:.4f} | {ph['coefficients']:.4f} | "
                  f"{ph['update']:.4f} | {t_first[m]:.1f} |")
    md += ["", f"Compiled / eager median step time: **{result['compiled_over_eager']:.3f}** (the rollout, generation, "
               "is not compiled in either mode)."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
