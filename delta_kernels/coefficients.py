"""Phase B: DelTA per-token coefficients (steps 2-7 of docs/design.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _checks as C
from ._backends import resolve
from ._checks import BackendCoefficients, DeltaStats
from .distributed import check_group, group_sum
from .head_factors import HeadFactorPasses, admit_head_vectors, flat_head_vectors
from .pipeline import run_coefficients


COUNT_FIELDS = ("n_pos", "n_neg", "n_valid")


@dataclass
class DeltaResult:
    coef: torch.Tensor                 # like logp; float32 (float64 for float64 inputs); 0 where masked
    weighted_advantages: torch.Tensor  # like logp: advantages * coef * mask
    stats: DeltaStats


def delta_coefficients(hidden: Optional[torch.Tensor], logp: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, *, k: int = 1, lam_min: float = 0.8, lam_max: float = 1.2,
                       eps: float = 1e-8, sketch_dim: Optional[int] = None, seed: int = 0, process_group=None,
                       backend: str = "auto", vectors: Optional[torch.Tensor] = None,
                       side_sums: Optional[torch.Tensor] = None, head_vectors=None,
                       check_values: bool = True) -> DeltaResult:
    """DelTA coefficients for one batch of response tokens.

    Args:
        hidden: [..., H] hidden states entering the LM head, leading dims equal to logp's.
            May be None when ``vectors`` is given.
        logp: [N] or [B, T] log-probs (<= 0) of the sampled tokens under the behaviour policy.
        advantages: shaped like logp, or [B] (one per sequence) when logp is [B, T].
        mask: shaped like logp, bool or 0/1; 0 marks padding.
        k: refinement steps (>= 0). lam_min <= lam_max: coefficient range before normalisation.
        sketch_dim: r; when set, the pipeline runs on z = v @ R (see token_sketch) instead of v.
        seed: seed of R.
        process_group: torch.distributed group; when set, every sum is all-reduced so each rank
            gets the coefficients of one process over the concatenated batch: 3k + 5 all_reduce
            calls per call (each packs the sums of one reduction point into one buffer: centroids
            k+1, temperatures 2(k+1), normalisation 1, side counts 1); backend "triton": 2k + 4
            (the moments travel with the gated sums, the side counts with the normalisation).
            None: per-call statistics.
        backend: "auto" or a registered name (delta_kernels._backends; "torch": float64 too).
        vectors: [..., D] precomputed token vectors (token_sketch's output) used instead of hidden.
        side_sums: [2, D] float, with ``vectors``: their side sums (sum a+ v, sum a- v), as the
            fused LM-head pass returns them; saves one read of ``vectors``.
        head_vectors: (u [..., r1], s [..., r2]), leading dims equal to logp's, from
            head_gradient_sketch: DelTA on the LM-head gradients z = u (x) s (flattened
            kron(u, s), D = r1 * r2) without forming z (delta_kernels/head_factors.py; the same
            torch-op passes on every backend). Instead of hidden and vectors; no sketch_dim.
        check_values: check finiteness, logp <= 0 and mask values (device syncs; turn off to
            capture the call in a CUDA graph).
    Returns:
        DeltaResult(coef, weighted_advantages, stats); mean of coef over valid tokens is 1.
    """
    cfg = C.DeltaConfig(k=k, lam_min=lam_min, lam_max=lam_max, eps=eps)
    if head_vectors is not None:
        return _head_coefficients(head_vectors, logp, advantages, mask, cfg, hidden=hidden, vectors=vectors,
                                  side_sums=side_sums, sketch_dim=sketch_dim, seed=seed, process_group=process_group,
                                  backend=backend, check_values=check_values)
    device = C.check_devices(hidden=hidden, vectors=vectors, side_sums=side_sums, logp=logp, advantages=advantages,
                             mask=mask)
    logp = C.check_logp("logp", logp, False)
    C.check_sketch_args(sketch_dim, seed)
    check_group(process_group)
    if (hidden is None) == (vectors is None):
        C.fail("hidden", "pass exactly one of hidden and vectors")
    kind, src = ("hidden", hidden) if vectors is None else ("vectors", vectors)
    flat_src, flat_mask = C.check_tokens(kind, src, logp, mask, check_values)
    flat_hidden, flat_vectors = (flat_src, None) if vectors is None else (None, flat_src)
    if vectors is not None and sketch_dim is not None and vectors.shape[-1] != sketch_dim:
        C.fail("vectors", f"last dim {vectors.shape[-1]} differs from sketch_dim={sketch_dim}")
    if side_sums is not None:
        if vectors is None:
            C.fail("side_sums", "only goes with vectors (the sums of those vectors)")
        side_sums = C.check_tensor("side_sums", side_sums)
        if tuple(side_sums.shape) != (2, vectors.shape[-1]):
            C.fail("side_sums", f"shape {list(side_sums.shape)} must be [2, {vectors.shape[-1]}]")
        if check_values:
            C.check_finite("side_sums", side_sums)
    adv = C.check_advantages(advantages, logp, check_values, flat_mask.reshape(logp.shape))
    dtype = C.compute_dtype(src.dtype, logp.dtype, advantages.dtype)
    cfg.check_compute_dtype(dtype)
    if check_values:
        C.check_advantage_range(adv, flat_mask, dtype)
    impl = resolve(backend, device, dtype, "delta_coefficients")
    batch = C.TokenBatch(
        shape=tuple(logp.shape), logp=logp.reshape(-1).contiguous(), advantages=adv.contiguous(),
        mask=flat_mask.contiguous(), hidden=C.rows_for(impl, flat_hidden), vectors=C.rows_for(impl, flat_vectors),
        side_sums=None if side_sums is None else side_sums.contiguous())
    out = impl.delta_coefficients(batch, cfg, sketch_dim, seed, group_sum(process_group))
    return _result(out, batch.shape, check_values)


def _result(out: BackendCoefficients, shape, check_values: bool) -> DeltaResult:
    coef = out.coef
    if check_values:  # a backstop: the checks above should prevent it
        overflow = ("the coefficients overflowed the compute dtype: the sums of advantages * token vectors are too "
                    "large; scale the advantages down")
        if C.compiling():
            C.assert_on_device(torch.isfinite(coef), "hidden", overflow)
        elif not bool(torch.isfinite(coef.sum())):
            C.fail("hidden", overflow)
    stats = out.stats
    stats.pred = stats.pred.reshape(shape)
    return DeltaResult(coef=coef.reshape(shape), weighted_advantages=out.weighted_advantages.reshape(shape),
                       stats=stats)


def _head_coefficients(head_vectors, logp, advantages, mask, cfg: C.DeltaConfig, *, hidden, vectors, side_sums,
                       sketch_dim, seed, process_group, backend, check_values) -> DeltaResult:
    """delta_coefficients with head_vectors: the pipeline over HeadFactorPasses, whatever the backend
    (resolved all the same: a named backend that cannot take the device or dtype says so)."""
    for name, given in (("hidden", hidden), ("vectors", vectors), ("side_sums", side_sums)):
        if given is not None:
            C.fail(name, "head_vectors replace hidden, vectors and side_sums; pass only head_vectors")
    if sketch_dim is not None:
        C.fail("sketch_dim", "head_vectors are sketched already (head_gradient_sketch's vocab_sketch_dim and "
                             "sketch_dim); leave sketch_dim None")
    u, s = admit_head_vectors(head_vectors)
    device = C.check_devices(**{"head_vectors[0]": u, "head_vectors[1]": s}, logp=logp, advantages=advantages,
                             mask=mask)
    logp = C.check_logp("logp", logp, False)
    C.check_sketch_args(None, seed)
    check_group(process_group)
    flat_mask = C.check_mask(mask, logp.shape, check_values)
    valid = flat_mask.reshape(logp.shape)
    if check_values:
        C.check_values_of_logp("logp", logp, valid)
    factors = flat_head_vectors(u, s, logp, valid, check_values)
    adv = C.check_advantages(advantages, logp, check_values, valid)
    dtype = C.compute_dtype(u.dtype, logp.dtype, advantages.dtype)
    cfg.check_compute_dtype(dtype)
    if check_values:
        C.check_advantage_range(adv, flat_mask, dtype)
    batch = C.TokenBatch(shape=tuple(logp.shape), logp=logp.reshape(-1).contiguous(), advantages=adv.contiguous(),
                         mask=flat_mask.contiguous(), vectors=factors)
    resolve(backend, device, dtype, "delta_coefficients")
    out = run_coefficients(HeadFactorPasses(dtype), batch, cfg, None, seed, group_sum(process_group))
    return _result(out, batch.shape, check_values)
