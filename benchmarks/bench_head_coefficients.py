"""Benchmark: DelTA on the LM-head gradient's factors against plain DelTA on explicit z (not a test).

Providers, at the same D = r1 * r2 and the same backend (default cpp on the CPU, triton on a GPU):
    factors   delta_coefficients(None, logp, adv, mask, head_vectors=(u [N, r1], s [N, r2]))
    explicit  delta_coefficients(None, logp, adv, mask, vectors=z [N, r1 * r2])   (z = u (x) s built once, untimed)
float32, k = 1, check_values=False. Floors (benchmarks/NOTES.md): explicit z is bandwidth-bound (4 reads of z at
k = 1), the factors compute-bound (7 GEMMs of 2 N r1 r2 flops); both are stated from a copy bandwidth and a GEMM
rate measured in the same run.

    python benchmarks/bench_head_coefficients.py              # N in {16384, 65536}, r1 = 16, r2 = 64
    python benchmarks/bench_head_coefficients.py --quick      # N = 16384, 3 reps

Writes benchmarks/results/head_coefficients_<machine>.{json,md} (machine, date, commit inside).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import delta_kernels as dk  # noqa: E402
from bench_info import git_commit, machine_name  # noqa: E402
from bench_timer import Timing, time_ms, time_providers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 1024


def rates(device):
    """(copy bandwidth GB/s, fp32 GEMM GFLOP/s at [16, N] x [N, 64], the factor GEMMs' shape)."""
    cuda = device == "cuda"
    n = (1 << 28) if cuda else (1 << 25)
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    bw = 2 * n * 4 / (time_ms(lambda: dst.copy_(src), reps=20, budget_s=1.0, cuda=cuda).median_ms * 1e-3) / 1e9
    a, b = torch.randn(16, 65536, device=device), torch.randn(65536, 64, device=device)
    gemm = 2 * 16 * 65536 * 64 / (time_ms(lambda: a @ b, reps=20, budget_s=1.0, cuda=cuda).median_ms * 1e-3) / 1e9
    return bw, gemm


def inputs(n, r1, r2, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = max(1, n // SEQ_LEN)
    t = n // b
    u = torch.randn(b, t, r1, generator=g).to(device)
    s = (torch.randn(b, t, r2, generator=g) + 0.5).to(device)
    logp = (-torch.rand(b, t, generator=g) * 3 - 1e-3).to(device)
    adv = torch.randn(b, generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
    return u, s, logp, adv, mask


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--r1", type=int, default=16)
    p.add_argument("--r2", type=int, default=64)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--backend", default=None, help="default: cpp on the CPU, triton on a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.quick:
        args.sizes, args.reps = [16384], 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    backend = args.backend or ("triton" if device == "cuda" else "cpp")
    bw, gemm = rates(device)
    r1, r2, k = args.r1, args.r2, args.k
    rows = []
    for n in args.sizes:
        u, s, logp, adv, mask = inputs(n, r1, r2, device)
        z = (u[..., :, None] * s[..., None, :]).flatten(-2)
        call = dict(k=k, backend=backend, check_values=False)
        fns = {"factors": lambda: dk.delta_coefficients(None, logp, adv, mask, head_vectors=(u, s), **call),
               "explicit": lambda: dk.delta_coefficients(None, logp, adv, mask, vectors=z, **call)}
        timings = time_providers(fns, reps=args.reps, warmup=1, cuda=device == "cuda")
        reads = 1 + (1 if k == 0 else k + 2)
        floors = {"factors": (2 + (1 if k == 0 else k + 2) + 2 * k) * 2 * n * r1 * r2 / (gemm * 1e9) * 1e3,
                  "explicit": reads * n * r1 * r2 * 4 / (bw * 1e9) * 1e3}
        for name in fns:
            t = timings[name]
            row = dict(provider=name, tokens=n, r1=r1, r2=r2, k=k, backend=backend, floor_ms=round(floors[name], 3))
            if isinstance(t, Timing):
                row.update(ms_p50=round(t.median_ms, 3), ms_p20=round(t.p20_ms, 3), ms_p80=round(t.p80_ms, 3),
                           frac_of_floor=round(floors[name] / t.median_ms, 3), status="ok")
            else:
                row["status"] = t
            rows.append(row)
        ok = {r["provider"]: r for r in rows[-2:] if r["status"] == "ok"}
        if len(ok) == 2:
            ok["factors"]["ratio_to_explicit"] = round(ok["factors"]["ms_p50"] / ok["explicit"]["ms_p50"], 3)
        del z
    meta = dict(machine=machine_name(device), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), commit=git_commit(), torch=torch.__version__, copy_bandwidth_gbs=round(bw, 1),
        gemm_gflops=round(gemm, 1), threads=torch.get_num_threads(), argv=sys.argv[1:],
        load_average_1min=round(os.getloadavg()[0], 2))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"head_coefficients_{meta['machine']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# DelTA on (u, s) against plain DelTA on explicit z ({device}, {backend})", "",
             f"Machine: {meta['machine']}; date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}. "
             f"Copy bandwidth {meta['copy_bandwidth_gbs']} GB/s, fp32 GEMM ([16, N] x [N, 64]) "
             f"{meta['gemm_gflops']} GFLOP/s, measured in this run. float32, k = {k}, check_values=False. "
             f"Load average at the end: {meta['load_average_1min']} on {os.cpu_count()} cores; "
             f"{torch.get_num_threads()} torch thread(s).", "",
             "Floors: explicit z, its reads at the copy bandwidth; factors, their GEMM flops at the GEMM rate "
             "(benchmarks/NOTES.md).", "",
             "| provider | tokens | r1 x r2 | p50 ms (p20-p80) | floor ms | of floor | factors / explicit | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['provider']} | {r['tokens']} | {r['r1']} x {r['r2']} | {r['ms_p50']} ({r['ms_p20']}-"
                         f"{r['ms_p80']}) | {r['floor_ms']} | {r['frac_of_floor']} | {r.get('ratio_to_explicit', '')} "
                         "| ok |")
        else:
            lines.append(f"| {r['provider']} | {r['tokens']} | {r['r1']} x {r['r2']} | | {r['floor_ms']} | | | "
                         f"{r['status']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
