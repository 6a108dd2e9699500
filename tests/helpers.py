"""Shared test helpers: the float64 oracle, tolerances, random inputs, an assert that reports."""
from __future__ import annotations

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
