"""The fused LM-head functions of backend="triton", gathered for the registry (delta_kernels._backends):
``logprob``, ``token_vectors`` (the phase-A kernel that writes v or z, shared with token_sketch),
``softmax_sketch`` (head_gradient_sketch's vocabulary sketch) and ``logprob_backward``, as in
torch_chunked.py."""
from .._optional import require

require("triton", "triton")  # before the kernel modules: a missing triton names its extra

from ..triton.pass1_token_vectors import written_vectors as token_vectors  # noqa: E402
from .triton_logprob import logprob  # noqa: E402
from .triton_logprob_grad import logprob_backward  # noqa: E402
from .triton_softmax_sketch import softmax_sketch  # noqa: E402

__all__ = ["logprob", "token_vectors", "logprob_backward", "softmax_sketch"]
