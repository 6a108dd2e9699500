"""The cpp target of issue 4 as a user meets it: the public ``delta_coefficients`` call with its
default value checks, cpp vs the torch reference vs naive DelTA, interleaved in one run.

    python benchmarks/bench_public_call.py [--tokens 32768] [--hidden 1024] [--reps 15]
    python benchmarks/bench_public_call.py --quick     # N = 4,096, H = 256, 5 reps

Writes benchmarks/results/public_call_<machine>.{json,md}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_info import parser, run_info, write_result  # noqa: E402
from bench_timer import time_providers  # noqa: E402

import delta_kernels as dk  # noqa: E402
from delta_kernels.naive import delta_coefficients_naive  # noqa: E402


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="N = 4,096, H = 256, 5 reps")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.hidden, a.reps = 4096, 256, 5
    g = torch.Generator().manual_seed(0)
    b = a.tokens // a.seq_len
    h = torch.randn(b, a.seq_len, a.hidden, generator=g)
    logp = -torch.rand(b, a.seq_len, generator=g) * 3
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, a.seq_len, generator=g) > 0.1
    calls = {
        "cpp": lambda: dk.delta_coefficients(h, logp, adv, mask, k=1, backend="cpp"),
        "torch": lambda: dk.delta_coefficients(h, logp, adv, mask, k=1, backend="torch"),
        "naive": lambda: delta_coefficients_naive(h, logp, adv, mask, k=1),
    }
    med = {n: t.median_ms for n, t in time_providers(calls, reps=a.reps, warmup=1, cuda=False).items()}
    row = dict(**run_info(), tokens=a.tokens, hidden=a.hidden, k=1, dtype="float32", reps=a.reps, median_ms=med,
               cpp_vs_torch=med["torch"] / med["cpp"], cpp_vs_naive=med["naive"] / med["cpp"])
    md = (f"# Public delta_coefficients call, default value checks ({row['machine']})\n\n"
          f"{row['date']}, commit {row['commit']}, torch {row['torch']}; N = {a.tokens}, H = {a.hidden}, float32, "
          f"k = 1; medians of {a.reps} interleaved repetitions; load average {row['load_average']}.\n\n"
          "| provider | median ms |\n|---|---|\n"
          + "".join(f"| {n} | {v:.1f} |\n" for n, v in med.items())
          + f"\ncpp is **{row['cpp_vs_torch']:.2f}x** faster than the torch reference and "
          f"**{row['cpp_vs_naive']:.1f}x** faster than naive DelTA.\n")
    write_result(a.out, "public_call", row, md)


if __name__ == "__main__":
    main()
