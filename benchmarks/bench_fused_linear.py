"""Benchmark: fused LM-head DelTA phases against materialised logits and peers (not a test).

GPU (default when CUDA is present): M in {8192, 32768} tokens (sequences of 1024), H = 4096,
V = 151,936, bf16. Providers for the surrogate forward+backward (gradients for hidden and
the LM head):
    torch      logits = h @ W.T materialised, float32 log_softmax, gather, torch surrogate
    liger      LigerFusedLinearGRPOLoss(beta=0, loss_type="dapo"), per-sequence advantages
    cce        cut_cross_entropy.linear_cross_entropy(reduction="none") + torch surrogate
    ours       fused_linear_clipped_surrogate_loss(backend="triton")
and, forward only, phase A (logp + sketch r = 256 + side sums): torch materialised vs ours, and
the fused head's vocabulary pass with and without the vocabulary sketch of head_gradient_sketch
(issue 26): "head" = logprob (log-sum-exp of the logits tiles), "head+vocab sketch" =
softmax_sketch (the same tiles plus exp(x - m) @ S1, 2 M V r1 more flops, r1 = --vocab-sketch-dim).
The matmul floor is stated from a bf16 GEMM measured in the same run: the fused surrogate
does 8 M H V flops (forward logits 2 MHV; backward: logits recompute 2 MHV, dH 2 MHV,
dW 2 MHV); a method that keeps the logits does 6 MHV; phase A does 2 MHV.

CPU (automatic without CUDA): small sizes (M in {1024, 2048}, H = 256, V = 32768), ours (torch chunked path) against torch
materialised, float32; memory is the analytic size of the largest logits buffer.

    python benchmarks/bench_fused_linear.py            # the sizes above
    python benchmarks/bench_fused_linear.py --quick    # one size, 3 reps (GPU M = 8192; CPU M = 1024)
    python benchmarks/bench_fused_linear.py --modes vocab-sketch   # one mode (file fused_linear_vocab-sketch_<machine>)

Writes <--out, default benchmarks/results>/fused_linear_<machine>.{csv,json,md} (machine tag of
bench_info.py) with date and commit, rewritten after each size and mode (an interrupted run keeps
what it measured). Timing: bench_timer.py, providers interleaved. A peer that cannot run is
recorded with the reason.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_info import git_commit, machine_name  # noqa: E402
from bench_timer import Timing, time_ms, time_providers  # noqa: E402
from delta_kernels._checks import SurrogateConfig  # noqa: E402
from delta_kernels.aggregation import Aggregation  # noqa: E402
from delta_kernels.fused_linear import (fused_linear_clipped_surrogate_loss,  # noqa: E402
                                        fused_linear_logprob_sketch, torch_chunked)
from delta_kernels.reference.surrogate import clipped_surrogate_loss as torch_surrogate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SEQ = 1024


def make_inputs(m, hdim, vocab, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = max(1, m // SEQ)
    t = m // b
    h = (torch.randn(b, t, hdim, generator=g) * 1.0).to(dtype).to(device)
    w = (torch.randn(vocab, hdim, generator=g) * (1.0 / hdim ** 0.5)).to(dtype).to(device)
    y = torch.randint(0, vocab, (b, t), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)                     # per sequence (GRPO)
    mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
    old_logp = (-torch.rand(b, t, generator=g) * 5 - 3).to(device)  # about log(1/V) scale
    return h, w, y, adv, mask, old_logp


# ---------------------------------------------------------------- providers (one fwd+bwd step each)

TOKEN_MEAN = Aggregation("token-mean")

def step_torch(h, w, y, adv, mask, old_logp, cfg):
    logits = (h @ w.T).float()
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    loss, _ = torch_surrogate(logp, old_logp, adv[:, None].expand_as(logp), mask, None, None, cfg, TOKEN_MEAN)
    loss.backward()


def step_ours(h, w, y, adv, mask, old_logp, cfg, backend):
    loss, _ = fused_linear_clipped_surrogate_loss(h, w, y, old_logp, adv, mask, clip_low=cfg.clip_low,
                                                  clip_high=cfg.clip_high, clip_c=cfg.clip_c, agg=TOKEN_MEAN.mode,
                                                  backend=backend, check_values=False)
    loss.backward()


def make_liger(cfg):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    mod = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, epsilon_low=cfg.clip_low,
                                   epsilon_high=cfg.clip_high, loss_type="dapo")

    def step(h, w, y, adv, mask, old_logp, cfg):
        out = mod(h, w, y, mask.long(), adv, old_per_token_logps=old_logp)
        (out[0] if isinstance(out, tuple) else out).backward()
    return step


def make_cce():
    from cut_cross_entropy import linear_cross_entropy

    def step(h, w, y, adv, mask, old_logp, cfg):
        logp = -linear_cross_entropy(h, w, y, reduction="none").float()
        loss, _ = torch_surrogate(logp, old_logp, adv[:, None].expand_as(logp), mask, None, None, cfg, TOKEN_MEAN)
        loss.backward()
    return step


def sketch_torch(h, w, y, adv, mask, r):
    from delta_kernels.sketch_matrix import sketch_matrix
    hf = h.reshape(-1, h.shape[-1])
    logp = torch.log_softmax((hf @ w.T).float(), -1).gather(-1, y.reshape(-1, 1))[:, 0]
    v = -torch.expm1(logp)[:, None] * hf.float()
    z = v @ sketch_matrix(h.shape[-1], r, 0, device=h.device)
    valid = mask.reshape(-1).float()
    a = adv[:, None].expand_as(mask).reshape(-1)
    sums = torch.stack([a.clamp_min(0) * valid, (-a).clamp_min(0) * valid]) @ z
    return logp, z.to(h.dtype), sums


# ---------------------------------------------------------------- measurement

def matmul_rate(device, dtype):
    """Measured dense GEMM rate (TFLOP/s) at 8192^3 (GPU) or 1024^3 (CPU)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    med = time_ms(lambda: a @ b, reps=10 if device == "cuda" else 3, cuda=device == "cuda").median_ms
    return 2 * n ** 3 / (med * 1e-3) / 1e12


MODES = ("surrogate", "phase-a", "vocab-sketch")


def vocab_sketch_rows(h2, w, m, hdim, vocab, dtype, backend, r1, reps, device, rate):
    """The fused head's one pass over the vocabulary without (logprob) and with (softmax_sketch) the
    vocabulary sketch of head_gradient_sketch."""
    from delta_kernels._backends import LM_HEAD, resolve
    ops = resolve(backend, h2.device, h2.dtype, LM_HEAD)
    mhv = m * hdim * vocab
    y = torch.zeros(m, dtype=torch.int64, device=h2.device)
    new = [dict(provider="head", mode="vocab pass: logprob", tokens=m, hidden=hdim, vocab=vocab, dtype=str(dtype),
                flops=2 * mhv),
           dict(provider="head+vocab sketch", mode=f"vocab pass: softmax_sketch r1={r1}", tokens=m, hidden=hdim,
                vocab=vocab, dtype=str(dtype), flops=2 * mhv + 2 * m * vocab * r1)]
    fns = {"head": lambda: ops.logprob(h2, w, None, y, 1.0, False),
           "head+vocab sketch": lambda: ops.softmax_sketch(h2, w, None, 1.0, r1, 0)}
    with torch.no_grad():
        return measure(new, fns, reps, device, rate, m, vocab)


def run(device, sizes, hdim, vocab, dtype, reps, providers, sketch_dim, emit, modes=MODES, vocab_sketch_dim=16):
    """Times every provider at every size (providers interleaved); emit(rows, rate) after each
    size and mode, so that an interrupted run keeps what it measured."""
    cfg = SurrogateConfig()
    rate = matmul_rate(device, dtype)
    rows = []
    makers = {"liger": lambda: make_liger(cfg), "cce": make_cce}
    steps, unavailable = {"torch": step_torch}, {}
    for name in ("liger", "cce"):
        if name in providers:
            try:
                steps[name] = makers[name]()
            except Exception as e:  # noqa: BLE001 - not installed on the machine, or API drift
                unavailable[name] = f"{type(e).__name__}: {e}"
    backend = "triton" if device == "cuda" else "torch"
    steps["ours"] = lambda *a: step_ours(*a, backend=backend)
    for m in sizes:
        h, w, y, adv, mask, old_logp = make_inputs(m, hdim, vocab, dtype, device)
        mhv = m * hdim * vocab
        if "vocab-sketch" in modes:
            rows += vocab_sketch_rows(h.reshape(-1, hdim), w, m, hdim, vocab, dtype, backend, vocab_sketch_dim, reps,
                                      device, rate)
            emit(rows, rate)
        if "surrogate" in modes:
            fns, new = {}, []
            for name in [q for q in ("torch", "liger", "cce", "ours") if q in providers]:
                row = dict(provider=name, mode="surrogate fwd+bwd", tokens=m, hidden=hdim, vocab=vocab,
                           dtype=str(dtype), flops=(8 if name == "ours" else 6) * mhv)
                new.append(row)
                if name in unavailable:
                    row["status"] = "not run: " + unavailable[name]
                    continue
                fns[name] = _train_step(steps[name], h, w, y, adv, mask, old_logp, cfg)
            rows += measure(new, fns, reps, device, rate, m, vocab)
            emit(rows, rate)
            del fns
        if "phase-a" not in modes:
            continue
        new = [dict(provider=name, mode=f"phase A fwd (sketch r={sketch_dim})", tokens=m, hidden=hdim, vocab=vocab,
                    dtype=str(dtype), flops=2 * mhv) for name in ("torch", "ours")]
        h2, y2, mask2 = h.reshape(-1, hdim), y.reshape(-1), mask.reshape(-1)
        a2 = adv[:, None].expand_as(mask).reshape(-1)
        fns = {"torch": lambda: sketch_torch(h, w, y, adv, mask, sketch_dim),
               "ours": lambda: fused_linear_logprob_sketch(h2, w, y2, sketch_dim=sketch_dim, advantages=a2, mask=mask2,
                                                           backend=backend, check_values=False)}
        with torch.no_grad():
            rows += measure(new, fns, reps, device, rate, m, vocab)
        emit(rows, rate)
        del h, w, fns
    return rows, rate


def _train_step(step, h, w, y, adv, mask, old_logp, cfg):
    """One forward+backward of a provider on its own leaf copies of h and w."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def fn():
        hh.grad = None
        ww.grad = None
        step(hh, ww, y, adv, mask, old_logp, cfg)
    return fn


def measure(rows, fns, reps, device, rate, m, vocab):
    """Fills the rows (one per provider, in order) from one interleaved timing of fns."""
    cuda = device == "cuda"
    timings = time_providers(fns, reps=reps, warmup=1, cuda=cuda)
    for row in rows:
        t = timings.get(row["provider"])
        if t is None:
            continue
        if not isinstance(t, Timing):
            row["status"] = t
            continue
        row.update(status="ok", ms_p50=round(t.median_ms, 3), ms_p20=round(t.p20_ms, 3), ms_p80=round(t.p80_ms, 3),
                   tflops=round(row["flops"] / (t.median_ms * 1e-3) / 1e12, 1 if cuda else 4),
                   floor_ms=round(row["flops"] / (rate * 1e12) * 1e3, 3))
        row["frac_of_floor"] = round(row["floor_ms"] / t.median_ms, 3)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fns[row["provider"]]()
            torch.cuda.synchronize()
            row["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        else:  # analytic: the largest logits buffer the method holds
            held = m * vocab if row["provider"] == "torch" else (min(m, torch_chunked.ROWS) * min(vocab, torch_chunked.COLS))
            row["logits_buffer_mib"] = round(held * 4 / 2**20, 2)
    return rows


def write(rows, rate, device, args):
    os.makedirs(args.out, exist_ok=True)
    meta = dict(machine=machine_name(device), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), torch=torch.__version__, device=device, matmul_tflops=round(rate, 1 if device == "cuda" else 4),
                flop_count="ours: 8 MHV (fwd logits 2, bwd recompute 2, dH 2, dW 2); methods keeping logits: 6 MHV; "
                           "phase A: 2 MHV",
                argv=sys.argv[1:], load_average_1min=round(os.getloadavg()[0], 2))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    part = "" if tuple(args.modes) == MODES else "_".join(args.modes) + "_"
    stem = os.path.join(args.out, f"fused_linear_{part}{meta['machine']}")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(stem + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    mem_col = "peak_extra_gib" if device == "cuda" else "logits_buffer_mib"
    lines = [f"# Fused LM-head kernels ({device})", "",
             f"Machine: {meta['machine']}; date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}, "
             f"triton {meta['triton']}. Measured dense matmul rate: {meta['matmul_tflops']} TFLOP/s "
             f"({'bf16' if device == 'cuda' else 'fp32'}). Flop count: {meta['flop_count']}. "
             f"Load average at the end: {meta['load_average_1min']} on {os.cpu_count()} cores.", "",
             f"| provider | mode | tokens | H | V | p50 ms (p20-p80) | TFLOP/s | floor ms | of floor | {mem_col} | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['provider']} | {r['mode']} | {r['tokens']} | {r['hidden']} | {r['vocab']} | "
                         f"{r['ms_p50']} ({r['ms_p20']}-{r['ms_p80']}) | {r['tflops']} | {r['floor_ms']} | "
                         f"{r['frac_of_floor']} | {r.get(mem_col, '')} | ok |")
        else:
            lines.append(f"| {r['provider']} | {r['mode']} | {r['tokens']} | {r['hidden']} | {r['vocab']} | "
                         f"| | | | | {r['status']} |")
    if any(r["mode"] == "surrogate fwd+bwd" for r in rows):
        lines += ["", "Objectives: torch, cce and ours compute the dual-clip DAPO surrogate (clip 0.2/0.28, clip_c 10, "
                  "token-mean; per-token advantages allowed); liger's loss_type='dapo' has no dual clip and takes one "
                  "advantage per sequence (the inputs here are per sequence, so only clip_c differs)."]
    if device != "cuda":
        lines += ["", "CPU run: ours is the chunked torch path (chunks of "
                  f"{torch_chunked.ROWS} x {torch_chunked.COLS}); liger and cce are GPU libraries and were not run "
                  "here. The GPU numbers come from running this script on a CUDA machine."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--sizes", type=int, nargs="*", help="token counts M")
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--sketch-dim", type=int, default=256)
    p.add_argument("--providers", nargs="*", default=["torch", "liger", "cce", "ours"])
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--vocab-sketch-dim", type=int, default=16, help="r1 of the vocab-sketch mode")
    p.add_argument("--quick", action="store_true", help="one size, 3 reps (GPU: M = 8192; CPU: M = 1024)")
    p.add_argument("--out", default=RESULTS, help="folder of the result files")
    args = p.parse_args()
    if args.quick:
        args.sizes = args.sizes or ([8192] if device_of(args) == "cuda" else [1024])
        args.reps = args.reps or 3
    device = device_of(args)
    if device == "cuda":
        sizes, hdim, vocab, dtype, reps = args.sizes or [8192, 32768], args.hidden or 4096, args.vocab or 151936, \
            torch.bfloat16, args.reps or 5
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        sizes, hdim, vocab, dtype, reps = args.sizes or [1024, 2048], args.hidden or 256, args.vocab or 32768, \
            torch.float32, args.reps or 3
    providers = args.providers if device == "cuda" else [q for q in args.providers if q in ("torch", "ours")]
    rows, rate = run(device, sizes, hdim, vocab, dtype, reps, providers, args.sketch_dim,
                     lambda rows, rate: write(rows, rate, device, args), args.modes, args.vocab_sketch_dim)
    part = "" if tuple(args.modes) == MODES else "_".join(args.modes) + "_"
    print(open(os.path.join(args.out, f"fused_linear_{part}{machine_name(device)}.md")).read())


def device_of(args) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


if __name__ == "__main__":
    main()
