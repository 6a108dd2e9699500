"""Benchmark of DeltaAccumulator against one delta_coefficients call (not a test).

One RL batch of N tokens arrives in micro-batches of MICRO tokens (the old-log-prob pass);
advantages come at finalize; value checks are on in every row (the accumulator always checks).
Rows: the one-shot call on the whole batch (exact and sketched), and the accumulator with
store="device", "host" and "sketch". Per row: median (p20, p80) time of all adds plus
finalize, peak memory beyond the inputs (CPU: process RSS; GPU: device memory, with the
micro-batches produced on the device one at a time so the stored batch shows),
and for store="host" the floor: the bytes host mode moves (one copy out at add, one copy back
per read) over the copy bandwidth measured in the same run, and the ratio to it.

    python benchmarks/bench_accumulator.py            # CPU: N = 32k, H = 1024 float32; GPU: N = 64k, H = 4096 bf16
    python benchmarks/bench_accumulator.py --quick    # tiny sizes

Writes benchmarks/results/accumulator_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_coefficients import HAS_GPU, copy_bandwidth_gbs, peak_extra_mib  # noqa: E402
from bench_info import git_commit, machine_name  # noqa: E402
from bench_timer import time_ms, time_providers  # noqa: E402

import delta_kernels as dk  # noqa: E402

K = 1
READS = (1 if K == 0 else K + 2) + 1  # per finalize with advantages at finalize (DeltaAccumulator docstring)


def host_copy_gbs() -> float:
    """GPU: pinned host -> device copy bandwidth, GB/s (bytes moved / time). CPU: None (host
    mode copies memory to memory; the floor uses copy_bandwidth_gbs)."""
    if not HAS_GPU:
        return None
    n = 1 << 28  # 512 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    med = time_ms(lambda: dst.copy_(src, non_blocking=True), budget_s=1.0).median_ms
    return n * 2 / (med * 1e-3) / 1e9


class Producer:
    """The micro-batches of one batch: CPU, views of tensors made once; GPU, each micro-batch
    drawn on the device when asked (what an old-log-prob pass hands over), so nothing of the
    batch exists on the device beyond what the consumer keeps."""

    def __init__(self, n, h, micro, dtype, device):
        self.n, self.h, self.micro, self.dtype, self.device = n, h, micro, dtype, device
        g = torch.Generator().manual_seed(0)
        rows = n // micro
        self.logp = (-torch.rand(rows, micro, generator=g) * 3 - 1e-3).to(device)
        self.adv = torch.randn(rows, micro, generator=g).to(device)
        self.mask = (torch.rand(rows, micro, generator=g) > 0.1).to(device)
        self.hidden = None if device.type == "cuda" else torch.randn(rows, micro, h, generator=g).to(dtype)

    def hidden_of(self, i):
        if self.hidden is not None:
            return self.hidden[i]
        g = torch.Generator(device=self.device).manual_seed(i)
        return torch.randn(self.micro, self.h, generator=g, device=self.device, dtype=self.dtype)

    def __len__(self):
        return self.n // self.micro


def one_shot(p: Producer, sketch_dim):
    hidden = torch.stack([p.hidden_of(i) for i in range(len(p))])
    return dk.delta_coefficients(hidden, p.logp, p.adv, p.mask, k=K, sketch_dim=sketch_dim)


def accumulate(p: Producer, store, sketch_dim):
    acc = dk.DeltaAccumulator(k=K, sketch_dim=sketch_dim, store=store)
    for i in range(len(p)):
        acc.add(p.hidden_of(i), p.logp[i], p.mask[i])
    return acc.finalize(p.adv.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    device = torch.device("cuda" if HAS_GPU else "cpu")
    if HAS_GPU:
        n, h, dtype, micro, r = (8192, 512, torch.bfloat16, 1024, 64) if args.quick else \
            (65536, 4096, torch.bfloat16, 4096, 256)
    else:
        n, h, dtype, micro, r = (4096, 128, torch.float32, 512, 32) if args.quick else \
            (32768, 1024, torch.float32, 4096, 256)
    p = Producer(n, h, micro, dtype, device)
    copy_gbs = copy_bandwidth_gbs()
    link_gbs = host_copy_gbs()
    elem = torch.empty((), dtype=dtype).element_size()
    batch_bytes = n * h * elem
    if HAS_GPU:   # out once at add, back once per read, over the pinned copy bandwidth
        floor_ms = (1 + READS) * batch_bytes / (link_gbs * 1e9) * 1e3
    else:         # a memory-to-memory copy at add (read + write); the passes read host memory directly
        floor_ms = (2 + READS) * batch_bytes / (copy_gbs * 1e9) * 1e3
    cases = [("one-shot", "-", None, lambda: one_shot(p, None)), ("one-shot", "-", r, lambda: one_shot(p, r)),
             ("accumulator", "device", None, lambda: accumulate(p, "device", None)),
             ("accumulator", "host", None, lambda: accumulate(p, "host", None)),
             ("accumulator", "sketch", r, lambda: accumulate(p, "sketch", r))]
    name = lambda kind, store, sketch_dim: f"{kind} {store} r={sketch_dim}"  # noqa: E731
    # interleaved: one call of each per round
    timings = time_providers({name(*c[:3]): c[3] for c in cases}, budget_s=args.budget_s * len(cases))
    rows = []
    for kind, store, sketch_dim, fn in cases:
        t = timings[name(kind, store, sketch_dim)]
        if isinstance(t, str):
            raise RuntimeError(f"{kind} {store}: {t}")
        row = dict(kind=kind, store=store, sketch_dim=sketch_dim, median_ms=t.median_ms, p20_ms=t.p20_ms,
                   p80_ms=t.p80_ms, peak_mib=peak_extra_mib(fn))
        if store == "host":
            row.update(floor_ms=floor_ms, floor_over_time=floor_ms / t.median_ms)
        rows.append(row)
        print(row, flush=True)
    load = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(machine=machine_name(), date=now.strftime("%Y-%m-%d %H:%M UTC"),
                commit=git_commit(), torch=torch.__version__, n=n, hidden=h, dtype=str(dtype).replace("torch.", ""),
                micro_batch_tokens=micro, k=K, reads_per_finalize=READS, copy_gbs=copy_gbs, host_link_gbs=link_gbs,
                batch_mib=batch_bytes / 2**20, load_avg=list(load), cpu_count=os.cpu_count(),
                device=torch.cuda.get_device_name() if HAS_GPU else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"accumulator_{meta['machine']}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    link = f"pinned host-to-device copy {link_gbs:.1f} GB/s, " if HAS_GPU else ""
    lines = [f"# DeltaAccumulator benchmark: {meta['machine']}", "",
             f"Date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, device {meta['device']}. "
             f"N = {n} tokens in micro-batches of {micro}, H = {h}, {meta['dtype']}, k = {K}, backend auto, "
             f"advantages at finalize ({READS} reads of the stored vectors). Batch {meta['batch_mib']:.0f} MiB. "
             f"Copy bandwidth {copy_gbs:.1f} GB/s, {link}measured in this run. Host floor = bytes host mode moves "
             f"(GPU: out once, back {READS} times, over the pinned copy bandwidth; CPU: one copy at add, read + write, "
             f"and {READS} reads, over the copy bandwidth). Peak = memory beyond the inputs "
             f"({'device memory; micro-batches drawn on the device one at a time' if HAS_GPU else 'process RSS'}). "
             f"Load average at the end: {' '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} cores.", "",
             "| call | store | r | median ms (p20-p80) | peak MiB | host floor ms | floor/time |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kind']} | {row['store']} | {row['sketch_dim'] or '-'} | {row['median_ms']:.1f} "
                     f"({row['p20_ms']:.1f}-{row['p80_ms']:.1f}) | {row['peak_mib']:.0f} | "
                     + (f"{row['floor_ms']:.1f} | {row['floor_over_time']:.2f} |" if 'floor_ms' in row else "- | - |"))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
