"""FIPO's overhead on the surrogate as a training step meets it: ``clipped_surrogate_loss`` forward +
backward with ``credit="fipo"`` (fipo_weights, its metrics, the dropped rows, then the surrogate)
vs the surrogate alone, and fipo_weights by itself; interleaved in one run, default value checks.

    python benchmarks/bench_credit_overhead.py [--tokens 32768] [--seq-len 256] [--backend cpp] [--reps 31]
        [--clock wall|thread]

--clock thread times each call by the calling thread's CPU time (time.thread_time; needs 1 torch
thread, since the kernels' OpenMP workers are not counted): on a shared machine the time other
processes take is then left out, where wall-clock medians grow with the load.

Writes benchmarks/results/credit_overhead_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_info import git_commit, machine_name  # noqa: E402
from bench_timer import time_providers  # noqa: E402

import delta_kernels as dk  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    dev = "cuda" if a.backend in ("triton", "cuda") else "cpu"
    if a.clock == "thread" and (dev != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock thread times one CPU thread: run with OMP_NUM_THREADS=1 on a CPU backend")
    g = torch.Generator().manual_seed(0)
    b = a.tokens // a.seq_len
    old = (-torch.rand(b, a.seq_len, generator=g) * 3 - 0.05).to(dev)
    logp = (old + 0.2 * torch.randn(b, a.seq_len, generator=g).to(dev)).clamp_max(-1e-4).requires_grad_()
    adv = torch.randn(b, generator=g).to(dev)
    mask = (torch.rand(b, a.seq_len, generator=g) > 0.1).to(dev)

    def step(credit):
        def run():
            loss, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, credit=credit, backend=a.backend)
            loss.backward()
            logp.grad = None
        return run

    calls = {"surrogate": step(None), "fipo+surrogate": step("fipo"),
             "fipo_weights": lambda: dk.fipo_weights(logp, old, adv, mask, backend=a.backend)}
    med = {n: t.median_ms for n, t in time_providers(calls, reps=a.reps, warmup=2, cuda=dev == "cuda",
                                                         clock=time.thread_time if a.clock == "thread"
                                                         else time.perf_counter).items()}
    overhead = med["fipo+surrogate"] / med["surrogate"] - 1
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    row = dict(machine=machine_name(dev), date=now,
               commit=git_commit(), torch=torch.__version__, backend=a.backend, tokens=b * a.seq_len,
               seq_len=a.seq_len, dtype="float32", reps=a.reps, median_ms=med, overhead=overhead,
               threads=torch.get_num_threads(), clock=a.clock, load_average=os.getloadavg())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / f"credit_overhead_{row['machine']}"
    out.with_suffix(".json").write_text(json.dumps(row, indent=2) + "\n")
    md = (f"# FIPO credit on the surrogate, forward + backward ({row['machine']}, backend {a.backend})\n\n"
          f"{row['date']}, commit {row['commit']}, torch {row['torch']}, {row['threads']} threads; "
          f"N = {row['tokens']} tokens as [{b}, {a.seq_len}], float32, default value checks; medians of {a.reps} "
          f"interleaved repetitions, {'thread CPU time' if a.clock == 'thread' else 'wall clock'}; "
          f"load average {tuple(round(x, 2) for x in row['load_average'])}.\n\n"
          "| provider | median ms |\n|---|---|\n" + "".join(f"| {n} | {v:.2f} |\n" for n, v in med.items())
          + f"\nFIPO adds **{100 * overhead:.1f}%** to the surrogate step (goal: <= 15%).\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
