"""Learning curves of DelTA and plain DAPO on the embedded task, over several seeds.

Each (seed, credit) pair is one full trainer run (same warm start for both credits of a
seed, since the warm start depends on the seed only). Recorded: held-out greedy accuracy
every --eval-every steps and sampled accuracy per step.

    python benchmarks/learning_curves.py                     # 3 seeds, default trainer settings
    python benchmarks/learning_curves.py --steps 60 --seeds 0 1

Writes benchmarks/results/trainer_learning_curves_<machine>.{csv,json,md,png}.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from delta_kernels.trainer.config import TrainerConfig  # noqa: E402
from delta_kernels.trainer.loop import run  # noqa: E402
from delta_kernels.trainer.report import read_metrics  # noqa: E402
from bench_info import git_commit, machine_name  # noqa: E402


def write_outputs(runs, meta, stem: Path) -> None:
    """JSON, CSV, PNG and Markdown of the runs (also used by --replot)."""
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, runs=runs), indent=2))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "credit", "step", "heldout_greedy_accuracy"])
        for r in runs:
            for step, acc in r["heldout"]:
                w.writerow([r["seed"], r["credit"], step, acc])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = {"delta": "tab:green", "none": "tab:blue"}
    for r in runs:
        axes[0].plot(*zip(*r["heldout"]), color=colours[r["credit"]], alpha=0.35, lw=1)
        w = 10
        smooth = [statistics.mean(r["sampled"][max(0, i - w + 1):i + 1]) for i in range(len(r["sampled"]))]
        axes[1].plot(range(1, len(smooth) + 1), smooth, color=colours[r["credit"]], alpha=0.35, lw=1)
    for credit, label in (("delta", "DelTA"), ("none", "DAPO")):
        mine = [r for r in runs if r["credit"] == credit]
        steps = [s for s, _ in mine[0]["heldout"]]
        mean = [statistics.mean(r["heldout"][i][1] for r in mine) for i in range(len(steps))]
        axes[0].plot(steps, mean, "o-", color=colours[credit], lw=2.5, label=f"{label} (mean of {len(mine)} seeds)")
    axes[0].set_title("held-out greedy accuracy")
    axes[1].set_title("sampled accuracy (T=1, mean of last 10 steps)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DelTA vs DAPO, embedded task ({meta['machine']}, commit {meta['commit']})")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)

    md = [f"# Learning curves: DelTA vs DAPO on the embedded task ({meta['machine']})", "",
          f"{meta['date']}, commit {meta['commit']}; {meta['steps']} RL steps per run, seeds {meta['seeds']}; "
          "held-out greedy accuracy (256 problems never trained on).", "",
          "| seed | credit | warm-start steps | before RL | after RL | gain | RL time (s) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        md.append(f"| {r['seed']} | {r['credit']} | {r['warm_start_steps']} | {r['before']:.3f} | {r['after']:.3f} | "
                  f"{r['after'] - r['before']:+.3f} | {r['time_rl_s']:.0f} |")
    for credit in ("delta", "none"):
        gains = [r["after"] - r["before"] for r in runs if r["credit"] == credit]
        afters = [r["after"] for r in runs if r["credit"] == credit]
        md.append(f"| mean | {credit} | | | {statistics.mean(afters):.3f} | {statistics.mean(gains):+.3f} | |")
    if meta.get("note"):
        md += ["", f"Note: {meta['note']}."]
    md += ["", f"![curves]({stem.with_suffix('.png').name})"]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=TrainerConfig.steps)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--replot", metavar="JSON", help="rewrite CSV/PNG/MD from a saved JSON result, no runs")
    args = ap.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        runs = data.pop("runs")
        write_outputs(runs, data, Path(args.replot).with_suffix(""))
        return
    commit = git_commit()  # the code the runs use (read before they start)
    machine = machine_name("cpu")  # the trainer runs on the CPU
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for credit in ("delta", "none"):
                cfg = TrainerConfig(credit=credit, seed=seed, steps=args.steps, eval_every=args.eval_every,
                                    device=args.device, progress=False, out=os.path.join(tmp, f"{credit}_{seed}"))
                s = run(cfg)
                rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
                runs.append(dict(seed=seed, credit=credit, before=s["accuracy_before_rl"], after=s["accuracy_after_rl"],
                                 time_rl_s=s["time_rl_s"], time_total_s=s["time_total_s"],
                                 warm_start_steps=s["warm_start_steps"],
                                 heldout=[(0, s["accuracy_before_rl"])] + [(r["step"] + 1, r["heldout_accuracy"])
                                                                         for r in rows if "heldout_accuracy" in r],
                                 sampled=[r["accuracy"] for r in rows]))
                print(f"seed {seed} {credit}: held-out {s['accuracy_before_rl']:.3f} -> {s['accuracy_after_rl']:.3f} "
                      f"({s['time_total_s']:.0f}s)", flush=True)
    meta = dict(machine=machine, date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit,
                steps=args.steps, seeds=args.seeds,
                config={k: v for k, v in vars(TrainerConfig(steps=args.steps, eval_every=args.eval_every,
                                                            device=args.device)).items()
                        if k not in ("out", "progress", "seed", "credit")})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(runs, meta, out / f"trainer_learning_curves_{machine}")


if __name__ == "__main__":
    main()
