"""The native kernels as torch.library custom ops (namespace ``delta_kernels``), so that
``torch.compile`` keeps them in one graph (docs/reliability.md, "Under torch.compile").

Each op is declared once here with its schema, its fake (shape/dtype) function and, for the
surrogate, its autograd formula; a backend module registers its kernel for its device type
(backends/cpp.py: "cpu", backends/cuda.py: "cuda"). Op bodies are the only place where data
pointers are taken. Inputs are contiguous float32 unless stated; ``x`` is hidden (f32/bf16/f16)
or materialised vectors, ``scale`` (or None) the per-row factor of implicit exact vectors; ``hidden``
and ``x`` may also be the caller's [B, T, D] view (last dim contiguous; N = B T), read in place
where the backend declares strided_rows (_backends.Backend).

    token_vectors(hidden [N,H], logp, a_pos, a_neg [N], sketch_dim (0: exact), seed, out_f32)
        -> v [N,D] (hidden's dtype, float32 when out_f32), sums [2,D]
    side_sums(x [N,D], scale?, a_pos, a_neg) -> sums [2,D]
    margins(x [N,D], scale?, w [D], centre [D]) -> m [N]
    gated_margins(x, scale?, w, centre, gamma [2], a_pos, a_neg) -> (m [N], sums [2,D])
    clipped_surrogate(logp, old_logp, adv [B,T], mask [B,T] bool, coef?, is_weight?, clip_low,
                      clip_high, clip_c) -> (rows [B,5] of aggregation.STATS (float64 on the
                      CPU, float32 on CUDA), token_grad [B,T] = w_t d l_t / d logp_t)
        differentiable in logp through the loss column rows[:, 0] only (the other columns are
        counts and metrics; token_grad is marked non-differentiable). The public calls take the
        gradient in one node with the aggregation instead (_native.SurrogateLoss: less host time)
    sketch_matrix(hidden_size, sketch_dim, seed) -> R [H, r] (CPU; no tensor input)
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from ..aggregation import STATS

NAMESPACE = "delta_kernels"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901 (one library object for this file's ops)

SCHEMAS = {
    "token_vectors": "(Tensor hidden, Tensor logp, Tensor a_pos, Tensor a_neg, int sketch_dim, int seed, "
                     "bool out_f32) -> (Tensor, Tensor)",
    "side_sums": "(Tensor x, Tensor? scale, Tensor a_pos, Tensor a_neg) -> Tensor",
    "margins": "(Tensor x, Tensor? scale, Tensor w, Tensor centre) -> Tensor",
    "gated_margins": "(Tensor x, Tensor? scale, Tensor w, Tensor centre, Tensor gamma, Tensor a_pos, "
                     "Tensor a_neg) -> (Tensor, Tensor)",
    "clipped_surrogate": "(Tensor logp, Tensor old_logp, Tensor adv, Tensor mask, Tensor? coef, Tensor? is_weight, "
                         "float clip_low, float clip_high, float clip_c) -> (Tensor, Tensor)",
    "sketch_matrix": "(int hidden_size, int sketch_dim, int seed) -> Tensor",
}
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

ops = torch.ops.delta_kernels


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


_kernels: Dict[Tuple[str, str], Callable] = {}  # (op name, device type) -> the registered kernel


def register_kernels(device_type: str, **kernels) -> None:
    """A backend's kernels for ``device_type`` (keyword = op name in SCHEMAS), registered as they
    are (Library.impl: no wrapper). sketch_matrix, which has no tensor input to dispatch on, is
    registered for every device (its kernel allocates on the CPU)."""
    for name, fn in kernels.items():
        _kernels[name, device_type] = fn
        _lib.impl(name, fn, "CompositeExplicitAutograd" if name == "sketch_matrix" else device_type.upper())


def call(name: str, *args):
    """Op ``name`` on ``args`` (the first a tensor): under torch.compile the op itself, which the
    graph holds; in eager the kernel registered for that tensor's device, called directly (the
    same function and bits, without the dispatcher's hop into Python: ~30 us per call on the
    2-core dev machine, benchmarks/NOTES.md). The op's autograd formula is not taken in eager:
    the callers pass tensors that need no gradient (SurrogateLoss carries the surrogate's)."""
    if torch.compiler.is_compiling():
        return getattr(ops, name).default(*args)
    return _kernels[name, args[0].device.type](*args)


def _sums(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(2, x.shape[-1], dtype=torch.float32)


def tokens(x: torch.Tensor):
    """N: the rows of a row operand, [N, D] or [B, T, D]."""
    return x.shape[:-1].numel()


@torch.library.register_fake(qualname("token_vectors"), lib=_lib)
def _token_vectors_fake(hidden, logp, a_pos, a_neg, sketch_dim, seed, out_f32):
    d = sketch_dim or hidden.shape[-1]
    out = hidden.new_empty(tokens(hidden), d, dtype=torch.float32 if out_f32 else hidden.dtype)
    return out, hidden.new_empty(2, d, dtype=torch.float32)


@torch.library.register_fake(qualname("side_sums"), lib=_lib)
def _side_sums_fake(x, scale, a_pos, a_neg):
    return _sums(x)


@torch.library.register_fake(qualname("margins"), lib=_lib)
def _margins_fake(x, scale, w, centre):
    return x.new_empty(tokens(x), dtype=torch.float32)


@torch.library.register_fake(qualname("gated_margins"), lib=_lib)
def _gated_margins_fake(x, scale, w, centre, gamma, a_pos, a_neg):
    return x.new_empty(tokens(x), dtype=torch.float32), _sums(x)


def surrogate_rows_dtype(device: torch.device) -> torch.dtype:
    """The dtype of clipped_surrogate's row statistics: the CPU kernel sums in float64, the CUDA
    kernel's per-tile float32 partials are added in float32."""
    return torch.float64 if device.type == "cpu" else torch.float32


@torch.library.register_fake(qualname("clipped_surrogate"), lib=_lib)
def _clipped_surrogate_fake(logp, old_logp, adv, mask, coef, is_weight, clip_low, clip_high, clip_c):
    rows = logp.new_empty(logp.shape[0], len(STATS), dtype=surrogate_rows_dtype(logp.device))
    return rows, logp.new_empty(logp.shape, dtype=torch.float32)


@torch.library.register_fake(qualname("sketch_matrix"), lib=_lib)
def _sketch_matrix_fake(hidden_size, sketch_dim, seed):
    return torch.empty(hidden_size, sketch_dim, dtype=torch.float32)


def _surrogate_setup(ctx, inputs, output):
    token_grad = output[1]
    ctx.mark_non_differentiable(token_grad)
    ctx.save_for_backward(token_grad)


def _surrogate_backward(ctx, grad_rows, _grad_token_grad):
    """d rows[b, 0] / d logp[b, t] = token_grad[b, t] (rows[:, 0] sums the row's token losses)."""
    (token_grad,) = ctx.saved_tensors
    return token_grad * grad_rows[:, :1].to(token_grad.dtype), None, None, None, None, None, None, None, None


torch.library.register_autograd(qualname("clipped_surrogate"), _surrogate_backward, setup_context=_surrogate_setup,
                                lib=_lib)
