"""compare.json, compare.md and compare.png of a ``delta-train compare`` folder, computed from
the runs' summary.json and metrics.jsonl files alone (so every number can be recomputed)."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .._optional import require
from .compare import BASELINE, INTERVAL, Run, mean_ci, t975
from .report import read_metrics

_DROP = ("seed", "credit", "out", "progress", "warm_start_cache")


def _load(r: Run) -> Optional[Dict]:
    if not r.done:
        return None
    with open(os.path.join(r.dir, "summary.json")) as f:
        return json.load(f)


def _rel(path: str, out: str) -> str:
    return os.path.relpath(path, out)


def summarize(out: str, runs: List[Run], meta: Dict) -> Dict:
    """Write <out>/compare.{json,md,png}; returns the compare.json object. The shape:
    {task, settings, seeds, arms: {ARM: {final_accuracy: [per seed], mean, ci95, credit_auc:
    [per seed] or null, train_reward, ...}}, paired: {baseline, ARM: {diff, mean, ci95, ...}},
    runs, failed}. A seed's entry is null where its run did not finish; a paired difference
    is null where either run of the seed did not."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    seeds = sorted({r.seed for r in runs})
    summaries = {(r.arm, r.seed): _load(r) for r in runs}
    first = next((s for s in summaries.values() if s is not None), None)
    task = first["task"] if first else None
    settings = {k: v for k, v in (first["config"] if first else {}).items() if k not in _DROP}
    baseline = BASELINE if BASELINE in arms else arms[0]
    settings.update(meta, interval=INTERVAL, baseline=baseline,
                    final_accuracy=f"mean of the last {settings.get('final_evals')} greedy held-out evaluations "
                                   f"({settings.get('heldout_size')} problems never trained on)",
                    train_reward="sampled (T=1) training reward averaged over all RL steps")
    if len(seeds) < 2:
        settings["interval_note"] = "one seed: intervals are null (need >= 2 seeds)"

    def per_seed(arm: str, key: str) -> List[Optional[float]]:
        return [(summaries.get((arm, s)) or {}).get(key) for s in seeds]

    result_arms = {}
    for arm in arms:
        acc, reward = per_seed(arm, "final_heldout_accuracy"), per_seed(arm, "mean_train_reward")
        auc, align = per_seed(arm, "credit_auc_mean"), per_seed(arm, "grad_alignment_mean")
        a, rw = mean_ci(acc), mean_ci(reward)
        result_arms[arm] = dict(
            final_accuracy=acc, mean=a["mean"], ci95=a["ci95"],
            credit_auc=auc if any(x is not None for x in auc) else None,
            credit_auc_mean=mean_ci(auc)["mean"],
            grad_alignment=align if any(x is not None for x in align) else None,
            grad_alignment_mean=mean_ci(align)["mean"],
            accuracy_before_rl=per_seed(arm, "accuracy_before_rl"),
            train_reward=reward, train_reward_mean=rw["mean"], train_reward_ci95=rw["ci95"],
            **({"reason": a["reason"]} if "reason" in a else {}))
    paired: Dict = {"baseline": baseline}
    for arm in arms:
        if arm == baseline:
            continue
        entry = {}
        for key, name in (("final_accuracy", "diff"), ("train_reward", "train_reward_diff"),
                          ("credit_auc", "credit_auc_diff")):
            mine, base = result_arms[arm][key], result_arms[baseline][key]
            if mine is None or base is None:  # no decisive labels on this task
                continue
            diff = [None if x is None or y is None else x - y for x, y in zip(mine, base)]
            st = mean_ci(diff)
            prefix = "" if name == "diff" else name[:-len("diff")]
            entry.update({name: diff, prefix + "mean": st["mean"], prefix + "ci95": st["ci95"]})
            if "reason" in st and name == "diff":
                entry["reason"] = st["reason"]
        paired[arm] = entry
    failed = [r.name for r in runs if summaries[(r.arm, r.seed)] is None]
    timing = {arm: per_seed(arm, "time_total_s") for arm in arms}
    result = dict(task=task, settings=settings, seeds=seeds, arms=result_arms, paired=paired,
                  runs={arm: {str(s): _rel(os.path.join(r.dir, "summary.json"), out)
                              for r in runs for s in [r.seed] if r.arm == arm} for arm in arms},
                  failed=failed, time_total_s=timing)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown(result))
    plot(result, runs, summaries, os.path.join(out, "compare.png"))
    return result


def _fmt(x: Optional[float], sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _ci(ci: Optional[List[float]], sign: bool = False) -> str:
    return "" if ci is None else f" [{_fmt(ci[0], sign)}, {_fmt(ci[1], sign)}]"


def markdown(result: Dict) -> str:
    """The table of compare.md: one row per arm."""
    st, base = result["settings"], result["paired"]["baseline"]
    lines = [f"# Credit comparison: task `{result['task']}`", "",
             f"Seeds {result['seeds']} (paired: each seed's arms share one warm start). Final held-out accuracy: "
             f"{st['final_accuracy']}. Training reward: {st['train_reward']}. Intervals: {st['interval']}.",
             "", "| arm | held-out accuracy | vs " + base + " (paired) | training reward | vs " + base
             + " (paired) | credit AUC | grad alignment |", "|---|---|---|---|---|---|---|"]
    for arm, a in result["arms"].items():
        p = result["paired"].get(arm, {})
        lines.append(
            f"| {arm} | {_fmt(a['mean'])}{_ci(a['ci95'])} | "
            + ("(baseline)" if arm == base else f"{_fmt(p.get('mean'), True)}{_ci(p.get('ci95'), True)}")
            + f" | {_fmt(a['train_reward_mean'])}{_ci(a['train_reward_ci95'])} | "
            + ("(baseline)" if arm == base else
               f"{_fmt(p.get('train_reward_mean'), True)}{_ci(p.get('train_reward_ci95'), True)}")
            + f" | {_fmt(a['credit_auc_mean'])} | {_fmt(a['grad_alignment_mean'])} |")
    before = [x for a in result["arms"].values() for x in a["accuracy_before_rl"] if x is not None]
    if before:
        lines += ["", f"Held-out accuracy of the warm start (before RL), mean over seeds: "
                      f"{sum(before) / len(before):.3f}."]
    if result["failed"]:
        lines += ["", f"Runs that did not finish (left out): {', '.join(result['failed'])}."]
    keys = ("steps", "prompts_per_step", "group_size", "lr", "max_grad_norm", "agg", "filler_len", "filler_chars",
            "branches", "path_len", "digits", "heldout_size", "oracle_floor", "hidden_size", "num_layers")
    lines += ["", "Settings: " + ", ".join(f"{k}={st[k]}" for k in keys if k in st) + ".",
              "", "![compare](compare.png)", ""]
    return "\n".join(lines)


def _band(curves: List[List[float]]):
    """Mean and 95% t band per column over the rows (columns with >= 2 rows get a band)."""
    mean, lo, hi = [], [], []
    for col in zip(*curves):
        vals = [v for v in col if v is not None and not math.isnan(v)]
        m = sum(vals) / len(vals) if vals else float("nan")
        half = 0.0
        if len(vals) > 1:
            half = t975(len(vals) - 1) * math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
        mean.append(m), lo.append(m - half), hi.append(m + half)
    return mean, lo, hi


def plot(result: Dict, runs: List[Run], summaries: Dict, path: str) -> None:
    """Held-out accuracy vs step (mean and 95% band over seeds), credit AUC per step and the
    training reward (mean of 10-step windows) per arm."""
    require("matplotlib", "trainer").use("Agg")
    plt = require("matplotlib.pyplot", "trainer")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, arm in enumerate(result["arms"]):
        colour = f"C{i}"
        mine = [(r, summaries[(r.arm, r.seed)]) for r in runs if r.arm == arm and summaries[(r.arm, r.seed)]]
        if not mine:
            continue
        curves = [[a for _, a in s["heldout_curve"]] for _, s in mine]
        width = min(len(c) for c in curves)
        steps = [st for st, _ in mine[0][1]["heldout_curve"][:width]]
        m, lo, hi = _band([c[:width] for c in curves])
        axes[0].plot(steps, m, "o-", color=colour, lw=2, ms=3, label=f"{arm} (n={len(mine)})")
        axes[0].fill_between(steps, lo, hi, color=colour, alpha=0.15)
        rows = [read_metrics(os.path.join(r.dir, "metrics.jsonl")) for r, _ in mine]
        n = min(len(x) for x in rows)
        auc = _band([[x[j].get("credit_auc", float("nan")) for j in range(n)] for x in rows])[0]
        if any(not math.isnan(v) for v in auc):
            axes[1].plot(range(n), auc, color=colour, lw=1.5, label=arm)
        w = 10
        reward = _band([[sum(x[k]["reward"] for k in range(j, min(j + w, n))) / len(range(j, min(j + w, n)))
                         for j in range(0, n, w)] for x in rows])
        xs = list(range(0, n, w))
        axes[2].plot(xs, reward[0], "o-", color=colour, lw=2, ms=3, label=arm)
        axes[2].fill_between(xs, reward[1], reward[2], color=colour, alpha=0.15)
    axes[0].set_title("held-out greedy accuracy (mean, 95% band)")
    axes[1].set_title("credit AUC of the per-token weights (0.5 = uniform)")
    axes[1].axhline(0.5, color="grey", lw=1, ls="--")
    axes[2].set_title(f"training reward (means of {w}-step windows)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"delta-train compare: task {result['task']}, seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
