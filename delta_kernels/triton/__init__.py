"""backend="triton": the main GPU path (runs on the CPU under TRITON_INTERPRET=1 for tests).

One file per kernel:
    token_vectors.py  phase A: exact vectors kept implicit as ScaledRows(h, 1 - exp(logp)), or
                      z = v @ R (signs hashed in-kernel), and the side sums, one read of hidden;
                      token_sketch writes v or z
    side_sums.py      side sums of vectors (a tensor or ScaledRows), one read
    margin_pass.py    m = 2 (v - c).w and the gated side sums, one read of v (ScaledRows: of h,
                      each row scaled on the fly)
    fused.py          delta_coefficients in 2k + 6 launches: the [N]/[D] math in the passes'
                      epilogues and one finalize kernel per reduction point (finalize.py)
    surrogate.py      phase C: dual-clip surrogate forward + backward (torch.autograd.Function)
    fipo.py           FIPO future-KL weights: the reverse discounted scan, one program per row block
    row_partials.py   the deterministic two-stage (per-group partials, fixed-order) reduction
    sketch_hash.py    the sketch matrix's hash in Triton

``delta_coefficients`` is fused.py's call, with or without a process group (rows too wide for
one tile: delta_kernels.pipeline.run_coefficients over the unfused passes, which
DeltaAccumulator also wraps). Exact
mode from hidden states: v = (1 - exp(logp)) h is never written; hidden is read 2 times for
k = 0 and k + 3 times for k > 0 (the side sums, the temperature pass, k fused gate-and-refine
passes, the final margins), each pass scaling the rows by the float32 1 - exp(logp), and
nothing [N, H] is written. Sketched: hidden once, z [N, r] written once, then z read once for
k = 0, else k + 2 times. From given vectors: v read as for z (plus once for the side sums when
not given). No host synchronisation.
"""
from __future__ import annotations

import sys

from .._optional import require

require("triton", "triton")  # before the kernel modules: a missing triton names its extra

from ..pipeline import run_coefficients  # noqa: E402
from .fipo import fipo_weights  # noqa: E402
from .fused import fused_coefficients, fused_supported  # noqa: E402
from .pass3_margins import margin_pass  # noqa: E402
from .side_sums import side_sums  # noqa: E402
from .surrogate import clipped_surrogate_loss  # noqa: E402
from .pass1_token_vectors import ScaledRows, token_sketch, token_vectors  # noqa: E402


PIPELINE_KERNELS = sys.modules[__name__]  # token_vectors, side_sums, margin_pass (for DeltaAccumulator)


def delta_coefficients(batch, cfg, sketch_dim, seed, reduce=None):
    """Same contract as delta_kernels.reference.delta_coefficients (float32 results): the fused
    call (fused.py, 2k + 6 kernels; with a process group also 2k + 4 all_reduce calls); rows too
    wide for one tile: the pipeline over the unfused passes, each sum all-reduced between them."""
    if fused_supported(batch, sketch_dim):
        return fused_coefficients(batch, cfg, sketch_dim, seed, reduce)
    return run_coefficients(sys.modules[__name__], batch, cfg, sketch_dim, seed, reduce)


__all__ = ["token_sketch", "delta_coefficients", "clipped_surrogate_loss", "token_vectors", "side_sums",
           "margin_pass", "ScaledRows", "PIPELINE_KERNELS", "fipo_weights"]
