"""backend="cuda" (csrc/cuda via delta_kernels._cuda) against the float64 reference; needs a GPU."""
from __future__ import annotations

import pytest
import torch

import delta_kernels as dk
from delta_kernels.aggregation import AGG_MODES as AGGS
from delta_kernels import _backends
from helpers import TOL, as64, assert_rel, make_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(1, 1, 3), (1, 7, 64), (3, 43, 100), (8, 125, 257), (4, 300, 1024)]
STATS = ("mu_pos", "mu_neg", "gamma_pos", "gamma_neg", "pred", "scale", "n_pos", "n_neg", "n_valid")


def _cuda(*ts):
    return tuple(t.cuda() for t in ts)


@pytest.mark.parametrize("sketch_dim", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_token_sketch(shape, dtype, sketch_dim):
    h, logp, _, _ = make_batch(*shape, dtype=dtype, seed=sum(shape))
    out = dk.token_sketch(*_cuda(h, logp), sketch_dim=sketch_dim, seed=7, backend="cuda")
    ref = dk.token_sketch(*as64(h, logp), sketch_dim=sketch_dim, seed=7, backend="torch")
    assert out.dtype == dtype and out.is_cuda
    assert_rel(out, ref, TOL[dtype], "vectors")


@pytest.mark.parametrize("seq_level", [True, False])
@pytest.mark.parametrize("sketch_dim", [None, 8])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_delta_coefficients(shape, dtype, k, sketch_dim, seq_level):
    h, logp, adv, mask = make_batch(*shape, dtype=dtype, seed=k + 10 * shape[2], seq_level=seq_level)
    out = dk.delta_coefficients(*_cuda(h, logp, adv, mask), k=k, sketch_dim=sketch_dim, seed=3, backend="cuda")
    ref = dk.delta_coefficients(*as64(h, logp, adv, mask), k=k, sketch_dim=sketch_dim, seed=3, backend="torch")
    assert_rel(out.coef, ref.coef, TOL[dtype], "coef")
    assert_rel(out.weighted_advantages, ref.weighted_advantages, TOL[dtype], "weighted_advantages")
    for name in STATS:
        assert_rel(getattr(out.stats, name), getattr(ref.stats, name), TOL[dtype], name)


def test_degenerate_batches():
    h, logp, adv, mask = make_batch(5, 11, 24, seed=2)
    out = dk.delta_coefficients(*_cuda(h, logp, torch.zeros_like(adv), mask), backend="cuda")
    assert torch.equal(out.coef.cpu(), mask.float())
    out = dk.delta_coefficients(*_cuda(h, logp, adv, torch.zeros_like(mask)), backend="cuda")
    assert torch.equal(out.coef.cpu(), torch.zeros(5, 11))
    pos = adv.abs() + 0.1
    out = dk.delta_coefficients(*_cuda(h, logp, pos, mask), backend="cuda")
    ref = dk.delta_coefficients(*as64(h, logp, pos, mask), backend="torch")
    assert_rel(out.coef, ref.coef, TOL[torch.float32], "coef")


def test_deterministic_run_to_run():
    h, logp, adv, mask = _cuda(*make_batch(16, 700, 256, seed=9))
    a = dk.delta_coefficients(h, logp, adv, mask, k=2, backend="cuda")
    b = dk.delta_coefficients(h, logp, adv, mask, k=2, backend="cuda")
    assert torch.equal(a.coef, b.coef) and torch.equal(a.stats.mu_pos, b.stats.mu_pos)


@pytest.mark.parametrize("with_coef", [False, True])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 125), (2, 3000)])
def test_clipped_surrogate(shape, agg, with_coef):
    g = torch.Generator().manual_seed(shape[1])
    old = -torch.rand(shape, generator=g) * 3
    logp = (old + 0.5 * torch.randn(shape, generator=g)).clamp_max(0)
    adv, mask = torch.randn(shape[0], generator=g), torch.rand(shape, generator=g) > 0.2
    coef = (0.5 + torch.rand(shape, generator=g)) if with_coef else None
    x = logp.cuda().requires_grad_()
    loss, met = dk.clipped_surrogate_loss(x, *_cuda(old, adv, mask), coef=None if coef is None else coef.cuda(),
                                          agg=agg, clip_c=3.0, backend="cuda")
    loss.backward()
    x64 = logp.double().requires_grad_()
    ref, ref_met = dk.clipped_surrogate_loss(x64, *as64(old, adv, mask), coef=None if coef is None else coef.double(),
                                             agg=agg, clip_c=3.0, backend="torch")
    ref.backward()
    assert_rel(loss, ref, 1e-5, "loss")
    for name in ref_met:
        assert_rel(met[name], ref_met[name], 1e-5, name)
    assert_rel(x.grad, x64.grad, 1e-5, "grad")


def test_auto_picks_a_gpu_backend():
    mod = _backends.resolve("auto", torch.device("cuda"), torch.float32, "delta_coefficients")
    assert mod.__name__ in ("delta_kernels.triton", "delta_kernels.backends.cuda")
