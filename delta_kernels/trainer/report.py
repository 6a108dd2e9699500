"""What a run leaves in --out: metrics.jsonl (one JSON object per RL step), curves.png
(reward / accuracy / entropy, and credit AUC / gradient alignment on tasks with free tokens),
responses.html (tokens coloured by their coefficient, decisive tokens underlined),
summary.json, and the text summary printed at the end."""
from __future__ import annotations

import html
import json
import os
from typing import Dict, List, Optional

from .._optional import require


class MetricsLog:
    """Appends one JSON line per step to <out>/metrics.jsonl and keeps the rows in memory."""

    def __init__(self, out_dir: Optional[str]):
        """out_dir None: rows kept in memory only (the ranks other than 0 of a data-parallel run)."""
        self.path = None if out_dir is None else os.path.join(out_dir, "metrics.jsonl")
        self.rows: List[Dict] = []
        if self.path is not None:
            open(self.path, "w").close()

    def append(self, row: Dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_metrics(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: List[Dict], path: str, title: str = "", heldout_before: Optional[float] = None) -> None:
    """Reward, sampled accuracy and entropy per step, plus held-out greedy accuracy (before RL at
    x=0, then after step s at x=s+1) on the accuracy panel, and on tasks with free tokens a
    fourth panel: credit AUC and gradient alignment per step. Agg backend, no display needed."""
    require("matplotlib", "trainer").use("Agg")
    plt = require("matplotlib.pyplot", "trainer")
    steps = [r["step"] for r in rows]
    credit = "credit_auc" in rows[0]
    fig, axes = plt.subplots(1, 4 if credit else 3, figsize=(17 if credit else 13, 3.6))
    if credit:
        ax = axes[3]
        for key in ("credit_auc", "grad_alignment"):
            pts = [(r["step"], r[key]) for r in rows if r[key] == r[key]]  # NaN: not measured that step
            if pts:
                ax.plot(*zip(*pts), "o-" if key == "grad_alignment" else "-", lw=1.5, ms=3, label=key)
        ax.axhline(0.5, color="grey", lw=1, ls="--")
        ax.set_title("credit vs decisive tokens")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, key in zip(axes, ("reward", "accuracy", "entropy")):
        ax.plot(steps, [r[key] for r in rows], lw=1, alpha=0.5, label="per step")
        if len(rows) >= 5:
            w = max(len(rows) // 20, 5)
            smooth = [sum(r[key] for r in rows[max(0, i - w + 1):i + 1]) / len(rows[max(0, i - w + 1):i + 1])
                      for i in range(len(rows))]
            ax.plot(steps, smooth, lw=2, label=f"mean of last {w}")
        if key == "accuracy":
            held = ([(0, heldout_before)] if heldout_before is not None else []) + [
                (r["step"] + 1, r["heldout_accuracy"]) for r in rows if "heldout_accuracy" in r]
            if held:
                ax.plot(*zip(*held), "o-", color="black", lw=1.5, label="held-out greedy")
            ax.legend(fontsize=8)
        ax.set_title(key + (" (sampled, T=1)" if key in ("reward", "accuracy") else ""))
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _colour(c: float, lo: float, hi: float) -> str:
    """Green for amplified (> 1), red for damped (< 1), white at 1."""
    if c >= 1.0:
        t = min((c - 1.0) / max(hi - 1.0, 1e-6), 1.0)
        return f"rgba(40,167,69,{0.15 + 0.75 * t:.2f})"
    t = min((1.0 - c) / max(1.0 - lo, 1e-6), 1.0)
    return f"rgba(220,53,69,{0.15 + 0.75 * t:.2f})"


def write_responses_html(samples: List[Dict], path: str, title: str) -> None:
    """One table row per response: prompt, answer, reward, advantage and each response token
    on a background coloured by its coefficient (hover shows the value); the task's decisive
    tokens (samples' "decisive" flags, when given) are underlined and bold."""
    coefs = [c for s in samples for c in s["coef"]] or [1.0]
    lo, hi = min(coefs + [1.0]), max(coefs + [1.0])
    rows = []
    for s in samples:
        flags = s.get("decisive") or [False] * len(s["tokens"])
        toks = "".join(
            f'<span class="tok{" dec" if d else ""}" style="background:{_colour(c, lo, hi)}" '
            f'title="coef {c:.3f}{", decisive" if d else ""}">{html.escape(t)}</span>'
            for t, c, d in zip(s["tokens"], s["coef"], flags))
        rows.append(f"<tr><td>{s.get('step', '')}</td><td><code>{html.escape(s['prompt'])}</code></td>"
                    f"<td><code>{html.escape(s['answer'])}</code></td><td>{s['reward']:.0f}</td>"
                    f"<td>{s['advantage']:+.2f}</td><td>{toks}</td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
.tok{{font-family:monospace;font-size:1.2em;padding:2px 4px;margin:1px;border-radius:3px;display:inline-block}}
.dec{{text-decoration:underline;font-weight:bold;border:1px solid #333}}</style>
</head><body><h2>{html.escape(title)}</h2>
<p>Each response token is coloured by its DelTA coefficient (mean 1 over the batch's valid tokens):
<span class="tok" style="background:{_colour(hi, lo, hi)}">green</span> amplified (&gt; 1),
<span class="tok" style="background:{_colour(lo, lo, hi)}">red</span> damped (&lt; 1). Range here
[{lo:.3f}, {hi:.3f}]. Hover a token for its value. <span class="tok dec">Underlined</span> tokens are
the task's decisive tokens (those whose choice decides the reward). Only responses with a non-zero advantage are shown
(the others carry no gradient).</p>
<table><tr><th>step</th><th>prompt</th><th>answer</th><th>reward</th><th>advantage</th><th>response tokens</th></tr>
{''.join(rows)}</table></body></html>"""
    with open(path, "w") as f:
        f.write(page)


def format_summary(summary: Dict) -> str:
    t = summary["time_split"]
    total = sum(t.values()) or 1.0
    split = ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in t.items())
    return "\n".join([
        f"credit={summary['credit']}  model={summary['model']} ({summary['parameters']:,} parameters)  "
        f"device={summary['device']}",
        f"held-out greedy accuracy: before RL {summary['accuracy_before_rl']:.3f} -> after RL "
        f"{summary['accuracy_after_rl']:.3f}  ({summary['heldout_size']} problems)",
        f"warm start: {summary['warm_start_steps']} SFT steps in {summary['time_warm_start_s']:.1f}s",
        f"RL: {summary['steps']} steps in {summary['time_rl_s']:.1f}s; time split: {split}",
        "model forwards per step (mean): " + ", ".join(f"{k} {v:g}" for k, v in summary["forwards_per_step"].items())
        + " (the same with --credit none: DelTA reuses the old-log-prob pass)",
        f"total wall time {summary['time_total_s']:.1f}s; outputs in {summary['out']}",
    ])
