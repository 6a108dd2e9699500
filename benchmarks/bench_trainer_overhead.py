"""Step-time overhead of DelTA in the reference trainer: --credit delta over --credit none.

Both modes run in ONE process on the SAME inputs: before each step the model, optimizer and
random-generator states are snapshotted; the step runs with one credit mode, the states are
restored, and it runs with the other (the order alternates step to step). Both therefore see
identical rollouts, so the only difference is the coefficient call. Reported: median step
time of each mode, the ratio, and the coefficient phase's share of the delta step (the same
overhead measured inside one step, less exposed to machine noise).

    python benchmarks/bench_trainer_overhead.py            # CPU, the embedded default model
    python benchmarks/bench_trainer_overhead.py --gpu      # CUDA, a ~101M-parameter model from config
    python benchmarks/bench_trainer_overhead.py --quick    # short run (either device)

Writes benchmarks/results/trainer_overhead_<machine>.{json,md}, rewritten after every measured
step pair from the second on (an interrupted run keeps the pairs it measured).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from delta_kernels.trainer.config import TrainerConfig  # noqa: E402
from delta_kernels.trainer.model import (ModelSize, build_default_model, count_parameters,  # noqa: E402
                                         embedded_size)
from delta_kernels.trainer.step import CreditConfig, UpdateConfig, rl_step  # noqa: E402
from delta_kernels.trainer.task import AdditionTask  # noqa: E402
from delta_kernels.trainer.tokenizer import CharTokenizer  # noqa: E402
from delta_kernels.trainer.warm_start import WarmStartConfig, supervised_warm_start  # noqa: E402

from bench_info import git_commit, machine_name  # noqa: E402

PHASES = ("rollout", "old_logprob", "coefficients", "update")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA with a ~101M-parameter model (hidden 768, 16 layers)")
    ap.add_argument("--steps", type=int, default=None, help="measured step pairs (default 40 CPU, 30 GPU)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured step pairs first")
    ap.add_argument("--prompts-per-step", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft-steps", type=int, default=None, help="warm start before timing (mixed rewards)")
    ap.add_argument("--out-dir", "--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="short run: 4 step pairs, 1 warm-up pair, 10 warm-start steps")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = args.steps or 4, 1
        args.sft_steps = 10 if args.sft_steps is None else args.sft_steps
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device")
    commit = git_commit()  # the code being measured (read before the run)
    steps = args.steps or (30 if args.gpu else 60)
    prompts = args.prompts_per_step or (64 if args.gpu else 32)
    d = TrainerConfig()  # the trainer's default embedded model on the CPU
    size = ModelSize(hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                     max_positions=64) if args.gpu else embedded_size(d.hidden_size, d.num_layers, d.num_heads)
    tok, task = CharTokenizer(), AdditionTask()
    model, arch = build_default_model(tok.vocab_size, size, 0, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)  # prompts and mini-batch order
    sampling_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(0)
    sft = args.sft_steps if args.sft_steps is not None else (100 if args.gpu else 300)
    if sft:
        supervised_warm_start(model, tok, task, WarmStartConfig(max_steps=sft, target_accuracy=0.3,
                                                                 lr=3e-4 if args.gpu else 3e-3), gen, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4 if args.gpu else 5e-4)
    update = UpdateConfig()
    times = {"delta": [], "none": []}
    phases = {"delta": {p: [] for p in PHASES}, "none": {p: [] for p in PHASES}}
    forwards = {}
    md = "fewer than 2 measured step pairs: nothing written"
    for i in range(args.warmup + steps):
        snap = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), gen.get_state(),
                sampling_gen.get_state())
        order = ("delta", "none") if i % 2 == 0 else ("none", "delta")
        for j, mode in enumerate(order):
            if j == 1:  # same starting point, same rollouts
                model.load_state_dict(snap[0])
                opt.load_state_dict(snap[1])
                gen.set_state(snap[2])
                sampling_gen.set_state(snap[3])
            res = rl_step(model, opt, tok, task, prompts_per_step=prompts, group_size=args.group_size,
                          max_new_tokens=4, credit=CreditConfig(credit=mode), update=update, generator=gen,
                          sampling_generator=sampling_gen)
            if i >= args.warmup:
                times[mode].append(res.metrics["time_step"])
                for p in PHASES:
                    phases[mode][p].append(res.metrics[f"time_{p}"])
                forwards[mode] = res.metrics["forwards_total"]
            if i >= args.warmup + 1 and j == 1:  # after every measured pair (from the second on): a timeout keeps them
                md = write_result(args, device, commit, arch, model, size, prompts, times, phases, forwards)
    print(md)


def write_result(args, device, commit, arch, model, size, prompts, times, phases, forwards) -> str:
    """Writes the json and md of the pairs measured so far; -> the md text."""
    steps = len(times["delta"])
    med = {m: statistics.median(v) for m, v in times.items()}
    paired = [d / n - 1.0 for d, n in zip(times["delta"], times["none"])]  # same inputs, same step
    share = statistics.median(c / s for c, s in zip(phases["delta"]["coefficients"], times["delta"]))
    result = dict(
        machine=machine_name(device), device=str(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
        commit=commit, torch=torch.__version__, threads=args.threads, model=arch,
        parameters=count_parameters(model), hidden_size=size.hidden_size, layers=size.num_layers,
        responses_per_step=prompts * args.group_size, measured_steps=steps,
        median_step_s=med, overhead_paired_median=statistics.median(paired),
        overhead_ratio_of_medians=med["delta"] / med["none"] - 1.0,
        overhead_second_run_effect=statistics.median(paired[1::2]) - statistics.median(paired[0::2]),
        coefficient_share_of_delta_step=share,
        median_phase_s={m: {p: statistics.median(v) for p, v in ph.items()} for m, ph in phases.items()},
        forwards_per_step=forwards, step_times_s=times)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"trainer_overhead_{result['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# Trainer step overhead of DelTA ({result['machine']})", "",
          f"{result['date']}, commit {result['commit']}, torch {result['torch']}, {args.threads} thread(s); "
          f"{arch} model, {result['parameters']:,} parameters (hidden {size.hidden_size}, {size.num_layers} layers), "
          f"{result['responses_per_step']} responses per step, {steps} measured step pairs on identical inputs.", "",
          "| credit | median step (s) | rollout | old-log-prob | coefficients | update | forwards/step |",
          "|---|---|---|---|---|---|---|"]
    for m in ("none", "delta"):
        ph = result["median_phase_s"][m]
        md.append(f"| {m} | {med[m]:.4f} | {ph['rollout']:.4f} | {ph['old_logprob']:.4f} | "
                  f"{ph['coefficients']:.4f} | {ph['update']:.4f} | {forwards[m]} |")
    md += ["", f"Step-time overhead of DelTA, median over step pairs of (delta / none - 1) on identical inputs: "
               f"**{100 * result['overhead_paired_median']:+.2f}%** (ratio of the two medians: "
               f"{100 * result['overhead_ratio_of_medians']:+.2f}%). Measured inside the delta step, the coefficient "
               f"phase takes **{100 * share:.2f}%** of it (median). The pair member that runs second is "
               f"{100 * result['overhead_second_run_effect']:+.2f}% slower or faster (order alternates, so this "
               "cancels in the paired median); the model forwards per step are the same in both modes."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


if __name__ == "__main__":
    main()
