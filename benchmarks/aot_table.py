"""Registers, spills, shared memory and CTAs/SM of every Triton kernel variant, compiled ahead of
time for sm_90 and sm_80 (no GPU needed; the local triton's ptxas does the work).

The variants are the ones the library really launches: the public calls run on meta tensors at
the target shapes (N = 65,536, H = 4,096; fused head M = 8,192, V = 151,936) with every
``kernel[grid](...)`` intercepted, so the block sizes, warps and stages are the wrappers' own.
Each distinct (kernel, signature, constexprs, warps, stages) is then compiled with
``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` and its PTX run through
``ptxas -v`` for the registers, spill bytes and stack; shared memory is triton's own.

    python benchmarks/aot_table.py                 # sm_90 and sm_80
    python benchmarks/aot_table.py --arch 90       # one architecture
    python benchmarks/aot_table.py --list          # the variants only, no compile

Writes benchmarks/results/aot_<arch>.md (table) and .json. CTAs/SM = the least of the register,
shared-memory, thread and block limits of the architecture (a whole warp's registers are
allocated in units of 256; shared memory per CTA includes 1 KiB reserved by the driver).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench_info import git_commit  # noqa: E402

# per architecture: registers/SM, max registers/thread, shared memory/SM usable by CTAs, max CTAs/SM,
# max threads/SM (CUDA programming guide, compute capability tables)
LIMITS = {90: dict(regs=65536, smem=228 * 1024, ctas=32, threads=2048),
          80: dict(regs=65536, smem=164 * 1024, ctas=32, threads=2048)}
RESERVED_SMEM = 1024  # per CTA, reserved by the CUDA driver (sm_80 and later)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1", torch.int8: "i8"}


# ---------------------------------------------------------------- tracing the launches

class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``: enough to rebuild its ASTSource."""

    def __init__(self, fn: JITFunction, args, kwargs):
        self.fn = fn
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        self.options = dict(dict(num_warps=4, num_stages=3), **options)
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        for p in fn.params:  # defaults of unpassed parameters
            if p.name not in bound and p.default is not p.default.__class__:
                bound[p.name] = p.default
        self.signature, self.constexprs, self.attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = bound[p.name]
            if p.is_constexpr:
                self.signature[p.name] = "constexpr"
                self.constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                self.signature[p.name] = "*" + DTYPES[v.dtype]
                self.attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
            elif isinstance(v, bool):
                self.signature[p.name] = "i1"
            elif isinstance(v, int):
                if v == 1 and not p.do_not_specialize:  # the JIT specialises 1 to a constant
                    self.signature[p.name] = "constexpr"
                    self.constexprs[p.name] = 1
                    continue
                self.signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0 and not p.do_not_specialize:
                    self.attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                self.signature[p.name] = "fp32"
            elif v is None:
                self.signature[p.name] = "constexpr"
                self.constexprs[p.name] = None
            else:
                raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self):
        return (self.fn.__module__, self.name, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.attrs)), tuple(sorted(self.options.items())))

    def describe(self) -> str:
        """The constexprs and pointer dtypes that tell the variants of one kernel apart."""
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items() if v is not None)
        dtypes = sorted({t[1:] for t in self.signature.values() if t.startswith("*") and t[1:] != "fp32"})
        return (f"{consts}; warps {self.options['num_warps']}, stages {self.options['num_stages']}"
                + (f"; {'/'.join(dtypes)}" if dtypes else ""))


def trace_launches():
    """Run the library's calls on meta tensors at the target shapes; -> distinct Launches, in order."""
    seen, launches = set(), []

    def run(self, *args, grid, warmup, **kwargs):  # every launch, through kernel[grid] or @triton.heuristics
        launch = Launch(self, args, dict(kwargs))
        if launch.key() not in seen:
            seen.add(launch.key())
            launches.append(launch)

    from delta_kernels import _checks
    from delta_kernels._backends import Backend
    old = (JITFunction.run, Backend.runs_on, _checks.refuse_unreadable)
    JITFunction.run = run
    Backend.runs_on = lambda self, device: True  # the registry lets meta tensors stand for CUDA ones
    # the input gate refuses meta tensors (no data to read); here nothing is read, kernels are only recorded
    _checks.refuse_unreadable = lambda name, x: None if getattr(x, "is_meta", False) else old[2](name, x)
    try:
        _run_calls()
    finally:
        JITFunction.run, Backend.runs_on, _checks.refuse_unreadable = old
    return launches


def _run_calls():
    import delta_kernels as dk
    from delta_kernels.fused_linear import fused_linear_clipped_surrogate_loss, fused_linear_logprob_sketch
    meta = torch.device("meta")
    n, h, t = 65536, 4096, 1024
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        hidden = torch.empty(n // t, t, h, dtype=dtype, device=meta)
        logp = torch.empty(n // t, t, device=meta)
        adv = torch.empty(n // t, device=meta)
        mask = torch.empty(n // t, t, dtype=torch.bool, device=meta)
        for k, r in ((0, None), (1, None), (2, None), (1, 256), (1, 1024)):
            dk.delta_coefficients(hidden, logp, adv, mask, k=k, sketch_dim=r, backend="triton", check_values=False)
        dk.token_sketch(hidden, logp, sketch_dim=256, backend="triton", check_values=False)
        dk.token_sketch(hidden, logp, sketch_dim=None, backend="triton", check_values=False)
    logp = torch.empty(n // t, t, device=meta, requires_grad=True)
    loss, _ = dk.clipped_surrogate_loss(logp, torch.empty_like(logp), torch.empty(n // t, device=meta),
                                        torch.empty(n // t, t, dtype=torch.bool, device=meta), backend="triton",
                                        check_values=False)
    loss.backward()
    loss, _ = dk.clipped_surrogate_loss(logp, torch.empty_like(logp), torch.empty(n // t, device=meta),
                                        torch.empty(n // t, t, dtype=torch.bool, device=meta), credit="fipo",
                                        backend="triton", check_values=False)  # the surrogate with coefficients
    loss.backward()
    # FIPO's weights: the op's body with the plain kernel (on meta tensors the op would take its fake)
    from delta_kernels.triton.fipo import _fipo_weights_kernel, launch_fipo_weights
    launch_fipo_weights(_fipo_weights_kernel, logp.detach(), torch.empty_like(logp.detach()),
                        torch.empty(n // t, t, device=meta), torch.empty(n // t, t, dtype=torch.bool, device=meta),
                        32.0, 2.3, 10.0, 1.0, 1.2, True, 10.0, 1.2 - 1e-7, 1.0 + 1e-7)
    m, v = 8192, 151936
    for dtype in (torch.bfloat16, torch.float32):
        hidden = torch.empty(m // t, t, h, dtype=dtype, device=meta, requires_grad=True)
        weight = torch.empty(v, h, dtype=dtype, device=meta, requires_grad=True)
        y = torch.empty(m // t, t, dtype=torch.int64, device=meta)
        adv = torch.empty(m // t, t, device=meta)
        mask = torch.empty(m // t, t, dtype=torch.bool, device=meta)
        with torch.no_grad():
            fused_linear_logprob_sketch(hidden, weight, y, sketch_dim=256, advantages=adv, mask=mask,
                                        backend="triton", check_values=False)
            dk.head_gradient_sketch(hidden, weight, y, vocab_sketch_dim=16, sketch_dim=64, backend="triton",
                                    check_values=False)
        loss, _ = fused_linear_clipped_surrogate_loss(hidden, weight, y, torch.empty(m // t, t, device=meta),
                                                      adv, mask, backend="triton", check_values=False)
        loss.backward()


# ---------------------------------------------------------------- compiling and reading ptxas

def compile_one(launch: Launch, cc: int):
    """-> dict(regs, spill_stores, spill_loads, stack, shared, ctas_per_sm, limit, seconds)."""
    t0 = time.perf_counter()
    target = GPUTarget("cuda", cc, 32)
    options = make_backend(target).parse_options(dict(launch.options))
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([get_ptxas(cc).path, "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}", str(ptx),
                              "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    warps = launch.options["num_warps"]
    shared = kernel.metadata.shared
    ctas, limit = occupancy(cc, regs, shared, warps)
    return dict(regs=regs, spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                stack=int(stack.group(1)) if stack else 0, shared=shared, warps=warps, ctas_per_sm=ctas,
                limit=limit, seconds=round(time.perf_counter() - t0, 1))


def occupancy(cc: int, regs: int, shared: int, warps: int):
    """-> (CTAs per SM, the resource that limits it)."""
    lim = LIMITS[cc]
    regs_per_warp = -(-regs * 32 // 256) * 256
    by = dict(registers=lim["regs"] // (regs_per_warp * warps), threads=lim["threads"] // (32 * warps),
              blocks=lim["ctas"])
    if shared:
        by["shared memory"] = lim["smem"] // (shared + RESERVED_SMEM)
    limit = min(by, key=by.get)
    return by[limit], limit


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="*", default=[90, 80], choices=sorted(LIMITS))
    ap.add_argument("--list", action="store_true", help="list the traced variants, compile nothing")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    launches = [x for x in trace_launches() if args.match in x.name]
    print(f"{len(launches)} kernel variants traced (triton {triton.__version__})", flush=True)
    if args.list:
        for x in launches:
            print(f"{x.name}: {x.describe()}")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for cc in args.arch:
        rows = []
        stem = out / f"aot_sm{cc}"
        for x in launches:
            row = dict(kernel=x.name, module=x.fn.__module__.replace("delta_kernels.", ""), variant=x.describe())
            try:
                row.update(compile_one(x, cc))
            except Exception as e:  # noqa: BLE001 - record the failure, go on with the others
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, stem, cc)  # row by row: an interrupted run keeps what it compiled


def write(rows, stem: Path, cc: int):
    stem.with_suffix(".json").write_text(json.dumps(dict(arch=f"sm_{cc}", triton=triton.__version__,
                                                         commit=git_commit(), rows=rows), indent=1))
    lines = [f"# Triton kernels compiled ahead of time for sm_{cc} (triton {triton.__version__}, commit {git_commit()})",
             "", "Generated by `benchmarks/aot_table.py`. Shared memory in bytes (triton's count); spills in bytes "
             "(ptxas stores/loads); CTAs/SM from registers, shared memory, threads and the block limit.", "",
             "| kernel | variant | regs | spill st/ld | stack | shared | warps | CTAs/SM (limit) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | | | | | | {r['error']} |")
        else:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} "
                         f"| {r['stack']} | {r['shared']} | {r['warps']} | {r['ctas_per_sm']} ({r['limit']}) |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
