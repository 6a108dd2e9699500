"""Benchmark of phase B+A: delta_coefficients from hidden states (not a test).

Providers: "naive" (delta_kernels.naive, the published structure; exact only) and every
backend of the registry (delta_kernels._backends; public API with backend=, when
delta_kernels.available_backends() lists it). Per size: median (p20, p80) time, peak
memory beyond the inputs, the bytes the fused pipeline must move and the bandwidth floor
from a copy bandwidth measured in the same run, and the fraction of that floor reached.

    python benchmarks/bench_coefficients.py                 # GPU grid, or CPU sizes without a GPU
    python benchmarks/bench_coefficients.py --quick         # tiny sizes
    python benchmarks/bench_coefficients.py --gpu-budget    # a short GPU configuration (gpu_check.sh)
    python benchmarks/bench_coefficients.py --providers torch,triton

Writes benchmarks/results/coefficients_<machine>.{csv,json,md}. On the CPU an interpreted
backend (triton) is skipped unless --providers names it.
Calls use check_values=False (no validation syncs), so the kernels are what is timed. On a GPU
the triton call is also replayed from a CUDA graph (provider "triton+graph"; the note says why
when the capture fails). Timing: benchmarks/bench_timer.py (providers interleaved). The result
files are rewritten after every size, so an interrupted run keeps the sizes it finished.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # so that an explicitly named triton provider can run

import delta_kernels as dk  # noqa: E402
from delta_kernels import _backends  # noqa: E402
from bench_info import git_commit, machine_name  # noqa: E402
from bench_timer import Timing, capture_graph, time_ms, time_providers  # noqa: E402

BACKENDS = {b.name: b for b in _backends.registered()}  # the registry, lowest priority first
ALL_PROVIDERS = ("naive",) + tuple(BACKENDS)
SEQ_LEN = 1024
GRAPHED = "triton+graph"  # the triton call replayed from a CUDA graph (GPU only)

# ---------------------------------------------------------------- memory

def _rss_kib(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def peak_extra_mib(fn):
    """Peak memory a call allocates beyond what exists before it, MiB. GPU: the caching
    allocator's peak; CPU: the process's peak RSS (VmHWM, reset through clear_refs)."""
    gc.collect()
    if HAS_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS:")
        fn()
        return (_rss_kib("VmHWM:") - base) / 1024
    except OSError:
        return float("nan")


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (read + write bytes / time) of a large tensor copy, GB/s."""
    n = (1 << 28) if HAS_GPU else (1 << 25)  # 1 GiB / 128 MiB of float32
    dev = "cuda" if HAS_GPU else "cpu"
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    med = time_ms(lambda: dst.copy_(src), reps=50, budget_s=1.0).median_ms
    del src, dst
    return 2 * n * 4 / (med * 1e-3) / 1e9


# ---------------------------------------------------------------- workloads

def pipeline_bytes(n: int, h: int, r, k: int, elem: int):
    """Bytes of each pass of the fused pipeline (pipeline.py). Exact (r None): the vectors stay
    implicit (every fast backend scales rows of hidden on the fly), so the side sums read hidden
    once and the margin passes read hidden again: 1 more read when k = 0, k + 2 more otherwise;
    nothing [N, H] is written. Sketched: token_vectors reads hidden and writes z, then the margin
    passes read z. [N]-sized traffic and the [G, 2, D] partials are left out (< 2% at GPU sizes)."""
    reads = 1 if k == 0 else k + 2
    if r is None:
        return {"side_sums": n * h * elem, "margin_passes": reads * n * h * elem}
    return {"token_vectors": n * h * elem + n * r * elem, "margin_passes": reads * n * r * elem}


def make_inputs(n: int, h: int, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = max(1, n // SEQ_LEN)
    t = n // b
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float32).to(dtype).to(device)
    logp = (-torch.rand(b, t, generator=g) * 3 - 1e-3).to(device)
    adv = torch.randn(b, generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
    return hidden, logp, adv, mask


def provider_fn(name, inputs, k, r):
    hidden, logp, adv, mask = inputs
    if name == "naive":
        if r is not None:
            return None, "the published method has no sketch"
        try:
            from delta_kernels.naive import delta_coefficients_naive
        except ImportError as e:
            return None, f"delta_kernels.naive missing ({e})"
        return (lambda: delta_coefficients_naive(hidden, logp, adv, mask, k=k)), ""
    if name not in dk.available_backends(all=True):
        return None, f"backend {name!r} not available"
    if not BACKENDS[name].runs_on(hidden.device):
        return None, f"{name} does not run on this device"
    return (lambda: dk.delta_coefficients(hidden, logp, adv, mask, k=k, sketch_dim=r, backend=name,
                                          check_values=False)), ""


def sizes(args):
    """-> list of (N, H, dtype, k, r)."""
    if args.quick:
        return [(2048, 128, torch.float32 if not HAS_GPU else torch.bfloat16, 1, None),
                (2048, 128, torch.float32 if not HAS_GPU else torch.bfloat16, 1, 32)]
    if not HAS_GPU:
        f32 = torch.float32
        return [(4096, 256, f32, 1, None), (4096, 256, f32, 1, 64), (32768, 1024, f32, 1, None)]
    bf16 = torch.bfloat16
    if args.gpu_budget:
        return [(16384, 4096, bf16, 1, None), (65536, 4096, bf16, 1, None), (65536, 4096, bf16, 1, 256),
                (65536, 4096, bf16, 1, 1024)]
    return [(n, h, bf16, 1, r) for n in (16384, 65536, 262144) for h in (2048, 4096, 5120) for r in (None, 256, 1024)]


def fits(n, h, dtype):
    if not HAS_GPU:
        return True
    free, _ = torch.cuda.mem_get_info()
    elem = torch.empty((), dtype=dtype).element_size()
    need = n * h * (2 * elem + 3 * 4)  # inputs, v, and the reference's float32 intermediates
    return need < 0.8 * free


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes")
    ap.add_argument("--gpu-budget", action="store_true", help="short GPU configuration (about 2 minutes)")
    ap.add_argument("--providers", default=None, help=f"comma list from {','.join(ALL_PROVIDERS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget per measurement, seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = set(providers) - set(ALL_PROVIDERS)
        if unknown:
            ap.error(f"unknown providers {sorted(unknown)}")
    else:
        providers = [p for p in ALL_PROVIDERS if HAS_GPU or p == "naive" or not BACKENDS[p].interpreted]
    budget = args.budget_s or (0.5 if args.gpu_budget or args.quick else (1.0 if HAS_GPU else 8.0))
    device = "cuda" if HAS_GPU else "cpu"
    machine, commit = machine_name(), git_commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bw = copy_bandwidth_gbs()
    print(f"# {machine}, commit {commit}, {date}; copy bandwidth {bw:.1f} GB/s", flush=True)

    rows = []
    for n, h, dtype, k, r in sizes(args):
        if not fits(n, h, dtype):
            print(f"skip N={n} H={h}: does not fit", flush=True)
            continue
        inputs = make_inputs(n, h, dtype, device)
        elem = inputs[0].element_size()
        passes = pipeline_bytes(n, h, r, k, elem)
        total = sum(passes.values())
        floor_ms = total / (bw * 1e9) * 1e3
        base = dict(machine=machine, date=date, commit=commit, N=n, H=h, dtype=str(dtype).replace("torch.", ""),
                    k=k, sketch_dim=r or 0, bytes_moved=total,
                    pass_bytes=";".join(f"{p}={b}" for p, b in passes.items()),
                    copy_gbs=round(bw, 1), floor_ms=floor_ms)
        fns, notes = {}, {}
        for p in providers:
            fn, why = provider_fn(p, inputs, k, r)
            if fn is None:
                notes[p] = why
            else:
                fns[p] = fn
        names = list(providers)
        if HAS_GPU and "triton" in fns:  # the call with check_values=False, captured once
            names.append(GRAPHED)
            replay, why = capture_graph(fns["triton"])
            if replay is None:
                notes[GRAPHED] = why
            else:
                fns[GRAPHED] = replay
        timings = time_providers(fns, reps=100 if HAS_GPU else 15, budget_s=budget * max(1, len(fns)))
        for p in names:
            row = dict(base, provider=p, median_ms=None, p20_ms=None, p80_ms=None, peak_mib=None,
                       frac_of_floor=None, note=notes.get(p, ""))
            t = timings.get(p)
            if isinstance(t, Timing):
                row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, frac_of_floor=floor_ms / t.median_ms)
                if p != GRAPHED:
                    row["peak_mib"] = peak_extra_mib(fns[p])
            elif t is not None:
                row["note"] = t
            rows.append(row)
            ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.3f} ms"
            print(f"N={n} H={h} r={r or '-'} {p:12s} {ms} {row['note']}", flush=True)
        del inputs, fns
        gc.collect()
        if HAS_GPU:
            torch.cuda.empty_cache()
        add_speedups(rows)
        write(rows, Path(args.out), machine, date, commit, bw)  # after every size: a timeout keeps what ran



def add_speedups(rows):
    def key(r):
        return (r["N"], r["H"], r["dtype"], r["k"], r["sketch_dim"])
    timed = {(key(r), r["provider"]): r["median_ms"] for r in rows if r["median_ms"]}
    for r in rows:
        for ref in ("torch", "naive"):
            # naive is exact only: sketched rows are compared with the exact naive run of that size
            base = timed.get((key(r), ref)) or timed.get(((r["N"], r["H"], r["dtype"], r["k"], 0), ref))
            r[f"speedup_vs_{ref}"] = base / r["median_ms"] if base and r["median_ms"] else None


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def write(rows, out: Path, machine, date, commit, bw):
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"coefficients_{machine}"
    fields = ["machine", "date", "commit", "provider", "N", "H", "dtype", "k", "sketch_dim", "median_ms", "p20_ms",
              "p80_ms", "peak_mib", "bytes_moved", "pass_bytes", "copy_gbs", "floor_ms", "frac_of_floor",
              "speedup_vs_torch", "speedup_vs_naive", "note"]
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(f"{stem}.json", "w") as f:
        json.dump(dict(machine=machine, date=date, commit=commit, copy_gbs=bw, rows=rows), f, indent=1)

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    lines = [f"# delta_coefficients benchmark: {machine}", "",
             f"Date {date}, commit {commit}, torch {torch.__version__}. Copy bandwidth measured in this run: "
             f"{bw:.1f} GB/s. Floor = bytes the fused pipeline moves (exact: k + 3 reads "
             "of hidden, 2 when k = 0, nothing written; sketched: read hidden, write z, k + 2 reads of z) / copy "
             "bandwidth. Times are medians; peak = memory beyond the inputs. "
             "Sketched rows' x naive compares with the exact naive run (the published method has no sketch). "
             f"Load average at the end: {_loadavg()}.", "",
             "| N | H | dtype | k | r | provider | median ms (p20-p80) | peak MiB | floor ms | floor/time "
             "| x torch | x naive | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "-" if r["median_ms"] is None else f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})"
        lines.append(f"| {r['N']} | {r['H']} | {r['dtype']} | {r['k']} | {r['sketch_dim'] or '-'} | {r['provider']} "
                     f"| {t} | {fmt(r['peak_mib'], '.0f')} | {r['floor_ms']:.2f} | {fmt(r['frac_of_floor'], '.2f')} "
                     f"| {fmt(r['speedup_vs_torch'], '.2f')} | {fmt(r['speedup_vs_naive'], '.2f')} | {r['note']} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv/.json/.md")


if __name__ == "__main__":
    main()
