"""Shared test helpers: the float64 oracle, tolerances, random inputs, an assert that reports."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from delta_kernels.reference.passes import TorchPasses

# docs/design.md: relative error ||out - ref|| / ||ref|| against the float64 reference.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Relative-norm check that reports NaN/inf and the first mismatching indices."""
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    bad = ~torch.isfinite(o) & torch.isfinite(r)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite elements where the reference is finite, first at {idx}")
    err = rel_err(o, r)
    if not err <= tol:
        worst = (o - r).abs().reshape(-1).argmax()
        idx = list(torch.unravel_index(worst, o.shape)) if o.dim() else []
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst at {[int(i) for i in idx]}: "
                             f"{o.reshape(-1)[worst].item()} vs {r.reshape(-1)[worst].item()}")


def make_batch(n_seq: int, seq_len: int, hidden: int, *, dtype=torch.float32, seed: int = 0, mask_frac: float = 0.2,
               zero_adv_frac: float = 0.1, device="cpu", seq_level: bool = True):
    """Fresh random inputs (never zeros): hidden [B, T, H], logp [B, T], advantages, mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_seq, seq_len, hidden, generator=g) + 0.3 * torch.randn(n_seq, 1, hidden, generator=g)
    logp = -torch.rand(n_seq, seq_len, generator=g) * 3 - 1e-3
    if seq_level:
        adv = torch.randn(n_seq, generator=g)
        adv[torch.rand(n_seq, generator=g) < zero_adv_frac] = 0
    else:
        adv = torch.randn(n_seq, seq_len, generator=g)
        adv[torch.rand(n_seq, seq_len, generator=g) < zero_adv_frac] = 0
    mask = torch.rand(n_seq, seq_len, generator=g) >= mask_frac
    return (h.to(dtype).to(device), logp.to(dtype).to(device), adv.to(dtype).to(device), mask.to(device))


def as64(*ts):
    return tuple(t.double() if t.is_floating_point() else t for t in ts)


class CountingPasses(TorchPasses):
    """The plain-torch pass kernels, counting the reads of v (token_vectors reads through side_sums)."""

    def __init__(self):
        self.reads = 0

    def side_sums(self, v, a_pos, a_neg):
        self.reads += 1
        return super().side_sums(v, a_pos, a_neg)

    def margin_pass(self, v, *args):
        self.reads += 1
        return super().margin_pass(v, *args)


def make_flat_or_batched(shape, hidden: int, dtype, seed: int, seq_level: bool = True, device="cpu"):
    """``make_batch`` for a token shape (B, T) or (N,): hidden, logp, advantages, mask on ``device``.
    Flat shapes take per-token advantages."""
    b, t = (1, shape[0]) if len(shape) == 1 else shape
    h, lp, adv, mask = make_batch(b, t, hidden, dtype=dtype, seed=seed, seq_level=seq_level or len(shape) == 1,
                                  device=device)
    if len(shape) == 1:
        h, lp, mask = h[0], lp[0], mask[0]
        adv = adv.reshape(1).expand(t).contiguous()
        if not seq_level:
            adv = torch.randn(t, generator=torch.Generator().manual_seed(seed + 7)).to(dtype).to(device)
    return h, lp, adv, mask


STAT_NAMES = ("mu_pos", "mu_neg", "gamma_pos", "gamma_neg", "pred", "scale", "n_pos", "n_neg", "n_valid")


def assert_matches_reference(out, ref, tol: float) -> None:
    """A DeltaResult against the float64 reference's: coef, weighted advantages and every
    statistic within ``tol`` (relative); W and b within ``tol`` of the centroid scale."""
    assert out.coef.dtype == torch.float32, f"coef dtype {out.coef.dtype}"
    assert_rel(out.coef, ref.coef, tol, "coef")
    assert_rel(out.weighted_advantages, ref.weighted_advantages, tol, "weighted_advantages")
    for name in STAT_NAMES:
        assert_rel(getattr(out.stats, name), getattr(ref.stats, name), tol, name)
    # W = mu+ - mu- and b (a difference of squared norms) cancel: their error is judged against
    # the size of the terms they are made of (docs/design.md, tolerances).
    mu_p, mu_n = ref.stats.mu_pos.double().cpu(), ref.stats.mu_neg.double().cpu()
    w_err = float((out.stats.W.double().cpu() - ref.stats.W.double().cpu()).norm())
    w_scale = float(mu_p.norm() + mu_n.norm())
    assert w_err <= tol * max(w_scale, 1e-30), f"W: error {w_err:.3e} > {tol:.1e} x centroid scale {w_scale:.3e}"
    b_err = abs(float(out.stats.b) - float(ref.stats.b))
    b_scale = 0.5 * float(mu_p.dot(mu_p) + mu_n.dot(mu_n))
    assert b_err <= tol * max(b_scale, 1e-30), f"b: error {b_err:.3e} > {tol:.1e} x centroid scale {b_scale:.3e}"


def run_gloo_ranks(worker: str, world: int, tmp_path, case: dict, *extra: str) -> list:
    """Saves ``case`` to tmp_path/case.pt, runs ``world`` processes of ``worker`` (argv: rank, world,
    init file, case file, output file, *extra; one OpenMP thread each) and returns each rank's
    torch.load-ed output, in rank order. A rank that fails fails the test with its output."""
    torch.save(case, tmp_path / "case.pt")
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(tmp_path / "init"),
                               str(tmp_path / "case.pt"), str(tmp_path / f"out{r}.pt"), *extra],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    # 600 s, not 120: three ranks running Triton under the interpreter took over 120 s on a 2-core machine
    # under load (the torch 2.14.1 suite run of 2026-12-07); a hung rank still fails, and no rank outlives it.
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out.decode()[-3000:]
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
