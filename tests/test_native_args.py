"""The native bindings take keyword arguments only, an unused pointer as None; the cuda backend refuses the
shapes its kernels do not take, naming the argument (checked before any device call, so this runs on the CPU)."""
from __future__ import annotations

import pytest
import torch

from delta_kernels import _cpp


def test_cpp_calls_are_keyword_only_with_named_pointers():
    with pytest.raises(TypeError):
        _cpp.side_sums(0, 0, None, 0, 0, 0, 0, 0)  # positional pointers are refused
    n, d = 5, 7
    x, a_pos, a_neg = torch.randn(n, d), torch.rand(n), torch.rand(n)
    sums = torch.full((2, d), float("nan"))
    _cpp.side_sums(dtype=0, x=x.data_ptr(), a_pos=a_pos.data_ptr(), a_neg=a_neg.data_ptr(), n_tokens=n, width=d,
                   sums=sums.data_ptr())  # scale left out: the rows as stored
    ref = torch.stack([a_pos.double() @ x.double(), a_neg.double() @ x.double()])
    torch.testing.assert_close(sums.double(), ref, rtol=1e-5, atol=1e-6)


def test_cuda_calls_are_keyword_only():
    _cuda = pytest.importorskip("delta_kernels._cuda")
    with pytest.raises(TypeError):
        _cuda.row_pass(0, 0, None, 1, 4)
    with pytest.raises(TypeError):
        _cuda.row_pass(dtype=0, x=0, n_tokens=1, width=4)  # the stream is required


@pytest.mark.parametrize("sketch_dim, name", [(8, "sketch_dim"), (None, "hidden")])
def test_cuda_token_vectors_refuses_sums_wider_than_shared_memory(sketch_dim, name):
    pytest.importorskip("delta_kernels._cuda")
    from delta_kernels.backends import cuda
    n, width = 3, 16385
    hidden = torch.randn(n, 8 if sketch_dim else width)
    logp, a = -torch.rand(n), torch.rand(n)
    with pytest.raises(ValueError, match=f"^{name}: backend='cuda' sums rows of at most 16384"):
        cuda.token_vectors(hidden, logp, a, a, width if sketch_dim else None, 0)


def test_cuda_sums_refuse_rows_wider_than_shared_memory():
    pytest.importorskip("delta_kernels._cuda")
    from delta_kernels.backends import cuda
    n, d = 2, 16385
    v, a, w = torch.randn(n, d), torch.rand(n), torch.randn(d)
    with pytest.raises(ValueError, match="^vectors: backend='cuda' sums rows of at most 16384"):
        cuda.side_sums(v, a, a)
    with pytest.raises(ValueError, match="^vectors: backend='cuda' sums rows of at most 16384"):
        cuda.margin_pass(v, w, w, (torch.ones(2), a, a))
