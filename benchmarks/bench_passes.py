"""Per-pass kernel timings of one ``delta_coefficients`` call, and its fixed cost (not a test).

For each configuration the triton call (check_values=False) runs under torch.profiler; every
device kernel it launches is listed with its launches per call, its device time, and for the
row passes the time the bytes it must move would take at the copy bandwidth measured in the same
run (bench_coefficients.copy_bandwidth_gbs). Also recorded: device launches per call, the
device time of the whole call, and the host time to issue one call on tiny inputs (the fixed
cost: N = 1,024, H = 64, no synchronisation inside the timed region; goal <= 150 µs, issue 14),
with the launches of that call counted by tests/launch_counter.py (Triton kernels + torch ops) for
k = 0..3, exact and sketched (goal: 2k + 6, 8 for exact k = 1).

    python benchmarks/bench_passes.py            # GPU: N = 65,536, H = 4,096, bf16, k = 1, exact and r = 256
    python benchmarks/bench_passes.py --quick    # GPU: N = 16,384; CPU: tiny sizes under the interpreter

On the CPU (no GPU) the triton backend runs under TRITON_INTERPRET=1, so the table holds the
torch ops' CPU times instead of kernels and the host time is the interpreter's: a check that the
script runs, not a measurement. The launch counts are the same on both.
Writes <--out>/passes_<machine>.{json,md}, rewritten after each configuration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_coefficients import HAS_GPU, copy_bandwidth_gbs, make_inputs  # noqa: E402  (sets the interpreter on CPU)

import torch  # noqa: E402

import delta_kernels as dk  # noqa: E402
from bench_info import git_commit, machine_name  # noqa: E402
from bench_timer import time_ms  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from launch_counter import LaunchCounter  # noqa: E402

if not HAS_GPU:  # the interpreter pays per loop iteration: 16 rows per tile, as the tests set (launches unchanged)
    import importlib
    importlib.import_module("delta_kernels.triton.pass3_margins").ROWS_PER_TILE = 16


def pass_bytes(kernel: str, n: int, h: int, r, elem: int):
    """Bytes a row pass must move (reads of its rows, the sketch's write of z), or None."""
    d = h if r is None else r
    if kernel.startswith("_sketch_rows_kernel"):
        return n * h * elem + n * r * elem
    if kernel.startswith(("_scaled_rows_kernel", "_margin_rows_kernel")):
        return n * d * elem
    return None


def profile_call(fn, iters: int):
    """-> {name: (launches, total device or CPU µs)} over iters calls of fn."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if HAS_GPU else [])
    fn()
    if HAS_GPU:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if HAS_GPU:
            torch.cuda.synchronize()
    out = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        if HAS_GPU:  # the device's own events (kernels, memsets, copies), not the ops that launched them
            us = e.self_device_time_total if e.device_type == torch.autograd.DeviceType.CUDA else 0
        else:
            us = e.self_cpu_time_total if e.key.startswith("aten::") else 0
        if us <= 0:
            continue
        out[e.key][0] += e.count
        out[e.key][1] += us
    return dict(out)


def host_us_per_call(fn, reps: int = 200) -> float:
    """Median host time to issue one call (no synchronisation inside the timed region), µs."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        if HAS_GPU and len(times) % 50 == 0:
            torch.cuda.synchronize()  # keep the launch queue from filling up
    times.sort()
    return times[len(times) // 2]


def launch_counts(inputs):
    """{"k=<k> exact|r=16": launches} of one check_values=False call on ``inputs`` (after a warm-up)."""
    out = {}
    for k in range(4):
        for r in (None, 16):
            call = lambda: dk.delta_coefficients(*inputs, k=k, sketch_dim=r, backend="triton",  # noqa: E731
                                                 check_values=False)
            call()
            with LaunchCounter() as lc:
                call()
            out[f"k={k} {'exact' if r is None else f'r={r}'}"] = lc.launches
    return out


def configs(quick: bool):
    if not HAS_GPU:
        return [(512, 64, torch.float32, 1, None), (512, 64, torch.float32, 1, 16)]
    n = 16384 if quick else 65536
    return [(n, 4096, torch.bfloat16, 1, None), (n, 4096, torch.bfloat16, 1, 256)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="GPU: N = 16,384")
    ap.add_argument("--iters", type=int, default=None, help="profiled calls per configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    device = "cuda" if HAS_GPU else "cpu"
    iters = args.iters or (20 if HAS_GPU else 2)
    bw = copy_bandwidth_gbs()
    meta = dict(machine=machine_name(), commit=git_commit(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), copy_gbs=bw,
                interpreter=not HAS_GPU)
    h, lp, adv, mask = make_inputs(1024, 64, torch.bfloat16 if HAS_GPU else torch.float32, device)
    # flat, one advantage per token: a per-sequence [B] advantage adds one broadcast copy per call
    tiny = (h.reshape(-1, h.shape[-1]), lp.reshape(-1), adv[:, None].expand(lp.shape).reshape(-1).contiguous(),
            mask.reshape(-1))
    tiny_call = lambda: dk.delta_coefficients(*tiny, k=1, backend="triton", check_values=False)  # noqa: E731
    meta["host_us_per_call_tiny"] = host_us_per_call(tiny_call, 200 if HAS_GPU else 3)
    meta["launches_tiny"] = launch_counts(tiny)
    print("launches per call (tiny):", meta["launches_tiny"], flush=True)
    results = []
    for n, h, dtype, k, r in configs(args.quick):
        inputs = make_inputs(n, h, dtype, device)
        elem = inputs[0].element_size()
        call = lambda: dk.delta_coefficients(*inputs, k=k, sketch_dim=r, backend="triton",  # noqa: E731
                                             check_values=False)
        wall = time_ms(call, reps=30 if HAS_GPU else 2, budget_s=2.0)
        kernels = []
        for name, (count, us) in sorted(profile_call(call, iters).items(), key=lambda kv: -kv[1][1]):
            b = pass_bytes(name, n, h, r, elem) if HAS_GPU else None
            floor_us = None if b is None else b / (bw * 1e9) * 1e6
            kernels.append(dict(kernel=name[:90], launches_per_call=count / iters, us_per_launch=us / count,
                                us_per_call=us / iters, floor_us_per_launch=floor_us,
                                floor_over_time=None if floor_us is None else floor_us / (us / count)))
        if HAS_GPU:
            launches = sum(x["launches_per_call"] for x in kernels)
        else:  # the profiler also sees the interpreter's own torch ops: count the call's launches instead
            with LaunchCounter() as lc:
                call()
            launches = lc.launches
        results.append(dict(N=n, H=h, dtype=str(dtype).replace("torch.", ""), k=k, sketch_dim=r or 0,
                            call_ms=wall.median_ms, call_p20_ms=wall.p20_ms, call_p80_ms=wall.p80_ms,
                            launches_per_call=launches,
                            device_us_per_call=sum(x["us_per_call"] for x in kernels), kernels=kernels))
        print(f"N={n} H={h} r={r or '-'}: {wall.median_ms:.3f} ms per call, "
              f"{results[-1]['launches_per_call']:.0f} launches", flush=True)
        write(meta, results, Path(args.out))
        del inputs


def write(meta, results, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"passes_{meta['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, configs=results), indent=1))
    what = "CPU times of torch ops (interpreter: not a measurement)" if meta["interpreter"] else "device kernels"
    lines = [f"# Per-pass timings of one triton delta_coefficients call ({meta['machine']})", "",
             f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}; copy bandwidth {meta['copy_gbs']:.1f} GB/s; "
             f"host time to issue one call at N = 1,024, H = 64: {meta['host_us_per_call_tiny']:.0f} µs"
             f"{' (the interpreter: not a GPU host time)' if meta['interpreter'] else ''}; launches per call there "
             f"(Triton kernels + torch ops): {', '.join(f'{c}: {v}' for c, v in meta['launches_tiny'].items())}. "
             f"Rows: {what}; floor = the pass's bytes / copy bandwidth.", ""]
    for c in results:
        lines += [f"## N = {c['N']}, H = {c['H']}, {c['dtype']}, k = {c['k']}, r = {c['sketch_dim'] or '-'}", "",
                  f"Call: {c['call_ms']:.3f} ms ({c['call_p20_ms']:.3f}-{c['call_p80_ms']:.3f}); "
                  f"{c['launches_per_call']:.0f} launches and {c['device_us_per_call']:.0f} µs of listed time per call.",
                  "", "| kernel | launches/call | µs/launch | µs/call | floor µs/launch | floor/time |",
                  "|---|---|---|---|---|---|"]
        for x in c["kernels"]:
            fl = "-" if x["floor_us_per_launch"] is None else f"{x['floor_us_per_launch']:.1f}"
            fr = "-" if x["floor_over_time"] is None else f"{x['floor_over_time']:.2f}"
            lines.append(f"| {x['kernel']} | {x['launches_per_call']:g} | {x['us_per_launch']:.1f} | "
                         f"{x['us_per_call']:.1f} | {fl} | {fr} |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
