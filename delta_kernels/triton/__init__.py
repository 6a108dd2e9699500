"""backend="triton": the main GPU path (runs on the CPU under TRITON_INTERPRET=1 for tests).

The coefficient path, in the order its launches run (fused.py imports the passes; a pass imports
only the leaves _common.py, row_partials.py and sketch_hash.py):
    pass1_token_vectors.py  phase A: exact vectors kept implicit as ScaledRows(h, 1 - exp(logp)), or
                            z = v @ R (signs hashed in-kernel), and the side sums, one read of hidden
                            (of the vectors, for given ones); token_sketch writes v or z
    pass2_centroids.py      centroids and discriminator from the summed partials
    pass3_margins.py        m = 2 (v - c).w and the gated side sums, one read of v (ScaledRows: of h,
                            each row scaled on the fly)
    pass4_temperatures.py   side_std's temperatures (k = 0: and the final totals)
    pass5_coefficients.py   the coefficients, weighted advantages, pred and the scalar results
    fused.py                delta_coefficients in 2k + 6 launches: the [N]/[D] math in the passes'
                            epilogues and one small kernel per reduction point; PIPELINE_KERNELS,
                            the unfused passes (for DeltaAccumulator and rows too wide for one tile)
    _common.py              the named scalar slots and the shared @triton.jit helpers
    row_partials.py         the deterministic two-stage (per-group partials, fixed-order) reduction
    sketch_hash.py          the sketch matrix's hash in Triton
Other phases:
    surrogate.py            phase C: dual-clip surrogate forward + backward (torch.autograd.Function)
    fipo.py                 FIPO future-KL weights: the reverse discounted scan, one program per row block

Exact mode from hidden states: v = (1 - exp(logp)) h is never written; hidden is read 2 times for
k = 0 and k + 3 times for k > 0 (the side sums, the temperature pass, k fused gate-and-refine
passes, the final margins), each pass scaling the rows by the float32 1 - exp(logp), and
nothing [N, H] is written. Sketched: hidden once, z [N, r] written once, then z read once for
k = 0, else k + 2 times. From given vectors: v read as for z (plus once for the side sums when
not given). No host synchronisation. The row kernels read hidden/vectors at row strides
(_common.row_layout): an [N, D] array or the caller's [B, T, D] view (a response slice
hidden[:, prompt_len:]) in place, with no [N, D] copy.
"""
from __future__ import annotations

from .._optional import require

require("triton", "triton")  # before the kernel modules: a missing triton names its extra

from ._common import ScaledRows  # noqa: E402
from .fipo import fipo_weights  # noqa: E402
from .fused import (PIPELINE_KERNELS, delta_coefficients, margin_pass, side_sums, token_sketch,  # noqa: E402
                    token_vectors)
from .surrogate import clipped_surrogate_loss  # noqa: E402

__all__ = ["token_sketch", "delta_coefficients", "clipped_surrogate_loss", "token_vectors", "side_sums",
           "margin_pass", "ScaledRows", "PIPELINE_KERNELS", "fipo_weights"]
