"""The fused LM-head functions of backend="triton", gathered for the registry (delta_kernels._backends):
``logprob``, ``token_vectors`` (the phase-A kernel that writes v or z, shared with token_sketch),
``softmax_sketch`` (head_gradient_sketch's vocabulary sketch) and ``logprob_backward``, as in
torch_chunked.py."""
from .._optional import require

require("triton", "triton")  # before the kernel modules: a missing triton names its extra

from ..triton.pass1_token_vectors import written_vectors  # noqa: E402
from .triton_logprob import logprob  # noqa: E402
from .triton_logprob_grad import logprob_backward  # noqa: E402
from .triton_softmax_sketch import softmax_sketch  # noqa: E402

__all__ = ["logprob", "token_vectors", "logprob_backward", "softmax_sketch"]


def token_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed, valid=None):
    """written_vectors, with the rows that are not ``valid`` ([N] bool or None) set to 0. Its side
    sums already select rows by a nonzero weight (a+ = a- = 0 at padding), so padding enters no
    sum; the written rows there are (1 - exp(logp)) h, NaN for a NaN h, hence the in-place fill
    (one pass over the output: the kernel in triton/pass1_token_vectors.py does not take the mask)."""
    vec, sums = written_vectors(hidden, logp, a_pos, a_neg, sketch_dim, seed)
    if valid is not None:
        vec.masked_fill_(~valid[:, None], 0.0)
    return vec, sums
