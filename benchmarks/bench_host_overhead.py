"""Host time per eager call at a tiny shape (B = 4, T = 16, H = 16, cpp, one thread), where the
kernels cost little and the Python around them (checks, dispatch) is most of the call: CPU time of
the process (time.process_time, less exposed to other processes than the wall clock), the minimum
over rounds of 200 calls.

    python benchmarks/bench_host_overhead.py [--label after] [--rounds 7]

Appends one row (label, commit, microseconds per call) to benchmarks/results/host_overhead_<machine>.json
and rewrites the .md table from all rows. Run it on two commits, alternating, to compare them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from bench_info import git_commit, machine_name  # noqa: E402

import delta_kernels as dk  # noqa: E402


def calls():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 16, 16, generator=g)
    logp = -torch.rand(4, 16, generator=g) - 1e-3
    adv, mask = torch.randn(4, generator=g), torch.rand(4, 16, generator=g) > 0.1
    lp = logp.clone().requires_grad_()

    def surrogate():
        loss, _ = dk.clipped_surrogate_loss(lp, logp, adv, mask, backend="cpp")
        loss.backward()

    return {"token_sketch": lambda: dk.token_sketch(h, logp, backend="cpp"),
            "delta_coefficients": lambda: dk.delta_coefficients(h, logp, adv, mask, k=1, backend="cpp"),
            "clipped_surrogate_loss+backward": surrogate}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    us = {}
    for name, fn in calls().items():
        for _ in range(50):
            fn()
        rounds = []
        for _ in range(a.rounds):
            t = time.process_time()
            for _ in range(200):
                fn()
            rounds.append((time.process_time() - t) / 200 * 1e6)
        us[name] = min(rounds)
    path = Path(a.out) / f"host_overhead_{machine_name()}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(dict(label=a.label, script_commit=git_commit(), package=str(Path(dk.__file__).parent),
                     torch=torch.__version__, us_per_call=us,
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    names = list(us)
    md = [f"# Host time per eager call, tiny shape, cpp, 1 thread ({machine_name()})", "",
          "CPU time of the process per call (us), minimum over rounds of 200 calls; B = 4, T = 16, H = 16, k = 1. "
          "Rows in the order run.", "", "| label | package | date | " + " | ".join(names) + " |",
          "|---|---|---|" + "---|" * len(names)]
    md += [f"| {r['label']} | {r['package']} | {r['date']} | " + " | ".join(f"{r['us_per_call'][n]:.0f}" for n in names)
           + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
