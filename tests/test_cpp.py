"""backend="cpp" (csrc/cpu via delta_kernels._cpp) against the float64 reference."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import delta_kernels as dk
from delta_kernels.aggregation import AGG_MODES as AGGS
from delta_kernels import _backends
from delta_kernels.sketch_matrix import sketch_matrix
from helpers import TOL, as64, assert_rel, make_batch

cpp = pytest.importorskip("delta_kernels.backends.cpp")

# (B, T, H): N = 1, 7, 129, 1000 tokens with H = 3, 64, 100, 257
SHAPES = [(1, 1, 3), (1, 7, 64), (3, 43, 100), (8, 125, 257)]
STAT_NAMES = ("mu_pos", "mu_neg", "gamma_pos", "gamma_neg", "pred", "scale", "n_pos", "n_neg", "n_valid")


def reference(h, logp, adv, mask, **kw):
    return dk.delta_coefficients(*as64(h, logp, adv, mask), backend="torch", **kw)


def assert_result(out, ref, tol):
    assert out.coef.dtype == torch.float32
    assert_rel(out.coef, ref.coef, tol, "coef")
    assert_rel(out.weighted_advantages, ref.weighted_advantages, tol, "weighted_advantages")
    for name in STAT_NAMES:
        assert_rel(getattr(out.stats, name), getattr(ref.stats, name), tol, name)
    # W and b are differences (of centroids, of squared norms) and cancel: their error is judged
    # against the size of the terms they are made of.
    mu_p, mu_n = ref.stats.mu_pos, ref.stats.mu_neg
    w_scale = float(mu_p.norm() + mu_n.norm())
    assert float((out.stats.W.double() - ref.stats.W).norm()) <= tol * max(w_scale, 1e-30), "W"
    b_scale = 0.5 * float(mu_p.dot(mu_p) + mu_n.dot(mu_n))
    assert abs(float(out.stats.b) - float(ref.stats.b)) <= tol * max(b_scale, 1e-30), "b"


@pytest.mark.parametrize("sketch_dim", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_token_sketch(shape, dtype, sketch_dim):
    h, logp, _, _ = make_batch(*shape, dtype=dtype, seed=sum(shape))
    out = dk.token_sketch(h, logp, sketch_dim=sketch_dim, seed=7, backend="cpp")
    ref = dk.token_sketch(*as64(h, logp), sketch_dim=sketch_dim, seed=7, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape
    assert_rel(out, ref, TOL[dtype], "vectors")


@pytest.mark.parametrize("seq_level", [True, False])
@pytest.mark.parametrize("sketch_dim", [None, 8])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_delta_coefficients(shape, dtype, k, sketch_dim, seq_level):
    h, logp, adv, mask = make_batch(*shape, dtype=dtype, seed=k + 10 * shape[2], seq_level=seq_level)
    out = dk.delta_coefficients(h, logp, adv, mask, k=k, sketch_dim=sketch_dim, seed=3, backend="cpp")
    assert_result(out, reference(h, logp, adv, mask, k=k, sketch_dim=sketch_dim, seed=3), TOL[dtype])


@pytest.mark.parametrize("with_sums", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_coefficients_from_vectors(dtype, with_sums):
    h, logp, adv, mask = make_batch(4, 37, 96, dtype=dtype, seed=5)
    v = dk.token_sketch(h, logp, backend="cpp")
    a = adv[:, None].expand_as(logp) * mask
    sums = torch.stack([(a.clamp_min(0)[..., None] * v.float()).sum((0, 1)),
                        ((-a).clamp_min(0)[..., None] * v.float()).sum((0, 1))]) if with_sums else None
    out = dk.delta_coefficients(None, logp, adv, mask, vectors=v, side_sums=sums, k=2, backend="cpp")
    ref = dk.delta_coefficients(None, *as64(logp, adv, mask), vectors=v.double(),
                                side_sums=None if sums is None else sums.double(), k=2, backend="torch")
    assert_result(out, ref, TOL[torch.float32])  # same vectors on both sides: only fp32 arithmetic differs


@pytest.mark.parametrize("hidden_size,sketch_dim,seed", [(1, 1, 0), (3, 5, 1), (64, 16, 12345), (257, 33, 2**32 - 1)])
def test_sketch_matrix_bitwise(hidden_size, sketch_dim, seed):
    assert torch.equal(cpp.sketch_matrix(hidden_size, sketch_dim, seed), sketch_matrix(hidden_size, sketch_dim, seed))


@pytest.mark.parametrize("sketch_dim", [None, 8])
def test_one_side_empty(sketch_dim):
    h, logp, adv, mask = make_batch(6, 20, 32, seed=1)
    adv = adv.abs() + 0.1  # no negative side
    out = dk.delta_coefficients(h, logp, adv, mask, sketch_dim=sketch_dim, backend="cpp")
    ref = reference(h, logp, adv, mask, sketch_dim=sketch_dim)
    assert_result(out, ref, TOL[torch.float32])
    assert torch.all(out.stats.mu_neg == 0) and float(out.stats.n_neg) == 0


def test_all_advantages_zero_gives_exactly_one():
    h, logp, adv, mask = make_batch(5, 11, 24, seed=2)
    out = dk.delta_coefficients(h, logp, torch.zeros_like(adv), mask, backend="cpp")
    assert torch.equal(out.coef, mask.float())
    assert torch.equal(out.weighted_advantages, torch.zeros_like(out.coef))


def test_all_masked_gives_zeros():
    h, logp, adv, mask = make_batch(3, 9, 16, seed=3)
    out = dk.delta_coefficients(h, logp, adv, torch.zeros_like(mask), backend="cpp")
    assert torch.equal(out.coef, torch.zeros_like(out.coef))
    assert torch.isfinite(out.stats.gamma_pos) and torch.isfinite(out.stats.gamma_neg)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_token(sign):
    h = torch.randn(1, 5)
    logp, adv, mask = torch.tensor([-0.7]), torch.tensor([sign]), torch.tensor([True])
    out = dk.delta_coefficients(h, logp, adv, mask, backend="cpp")
    assert_result(out, reference(h, logp, adv, mask), TOL[torch.float32])
    assert torch.allclose(out.coef, torch.ones(1))


def _surrogate_inputs(shape, dtype, seed, seq_level=True):
    h, old, adv, mask = make_batch(*shape, 1, dtype=torch.float32, seed=seed, seq_level=seq_level)
    g = torch.Generator().manual_seed(seed + 1)
    logp = (old + 0.4 * torch.randn(old.shape, generator=g)).clamp_max(0)
    coef = 0.5 + torch.rand(old.shape, generator=g)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, coef.to(dtype)


@pytest.mark.parametrize("with_coef", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (8, 125), (2, 1500)])
def test_clipped_surrogate(shape, agg, dtype, with_coef):
    logp, old, adv, mask, coef = _surrogate_inputs(shape, dtype, seed=shape[1])
    coef = coef if with_coef else None
    x = logp.clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(x, old, adv, mask, coef=coef, agg=agg, clip_c=3.0, backend="cpp")
    loss.backward()
    x64 = logp.double().requires_grad_()
    ref, ref_metrics = dk.clipped_surrogate_loss(x64, *as64(old, adv, mask), coef=None if coef is None else coef.double(),
                                                 agg=agg, clip_c=3.0, backend="torch")
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel(loss, ref, TOL[torch.float32], "loss")  # bf16 inputs are exact in float32: fp32 arithmetic only
    for name in ("clip_frac", "clip_frac_lower", "ppo_kl"):
        assert_rel(metrics[name], ref_metrics[name], TOL[torch.float32], name)
    assert x.grad.dtype == dtype
    assert_rel(x.grad, x64.grad, TOL[dtype], "d loss / d logp")


def test_clipped_surrogate_flat_and_clipping_paths():
    """[N] inputs; ratios far outside the clip range, past the dual clip, and past the +-20 clamp."""
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(999, generator=g) * 4
    old[::50] = -30.0  # log-ratio clamped at 20
    logp = (old + torch.randn(999, generator=g) * 3).clamp_max(0)
    adv = torch.randn(999, generator=g)
    mask = torch.rand(999, generator=g) > 0.1
    x = logp.clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(x, old, adv, mask, clip_c=3.0, backend="cpp")
    (loss * 2.5).backward()
    x64 = logp.double().requires_grad_()
    ref, ref_metrics = dk.clipped_surrogate_loss(x64, *as64(old, adv, mask), clip_c=3.0, backend="torch")
    (ref * 2.5).backward()
    assert float(ref_metrics["clip_frac_lower"]) > 0 and float(ref_metrics["clip_frac"]) > 0
    assert_rel(loss, ref, 1e-5, "loss")
    for name in metrics:
        assert_rel(metrics[name], ref_metrics[name], 1e-5, name)
    assert_rel(x.grad, x64.grad, 1e-5, "grad")


def test_auto_picks_cpp_on_cpu():
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32, "delta_coefficients") is cpp
    assert _backends.resolve("auto", torch.device("cpu"), torch.bfloat16, "clipped_surrogate_loss") is cpp
    with pytest.raises(TypeError):
        _backends.resolve("cpp", torch.device("cpu"), torch.float64, "delta_coefficients")


_THREAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import delta_kernels as dk
    from delta_kernels.backends import cpp
    from helpers import make_batch
    h, logp, adv, mask = make_batch(40, 130, 72, seed=11)
    out = {{}}
    for sk in (None, 8):
        r = dk.delta_coefficients(h, logp, adv, mask, k=2, sketch_dim=sk, backend="cpp")
        out[f"coef{{sk}}"] = r.coef
        out[f"mu{{sk}}"] = r.stats.mu_pos
    out["z37"] = dk.token_sketch(h, logp, sketch_dim=37, backend="cpp")  # several panels and a remainder
    out["z37_bf16"] = dk.token_sketch(h.bfloat16(), logp, sketch_dim=37, backend="cpp")
    flat_h = h.reshape(-1, 72)
    a = adv[:, None].expand_as(logp).reshape(-1) * mask.reshape(-1)
    v, sums = cpp.token_vectors(flat_h, logp.reshape(-1), a.clamp_min(0), (-a).clamp_min(0), None, 0)
    out["sums"] = sums
    out["side_sums"] = cpp.side_sums(v, a.clamp_min(0), (-a).clamp_min(0))
    w = torch.randn(72, generator=torch.Generator().manual_seed(0))
    m, g = cpp.margin_pass(v, w, torch.full((72,), 0.3), (torch.tensor([1.5, 0.7]), a.clamp_min(0), (-a).clamp_min(0)))
    out["m"], out["gated"] = m, g
    vb = cpp.ScaledRows(flat_h.bfloat16(), -torch.expm1(logp.reshape(-1)))
    out["side_sums_bf16"] = cpp.side_sums(vb, a.clamp_min(0), (-a).clamp_min(0))
    out["m_bf16"], out["gated_bf16"] = cpp.margin_pass(vb, w, torch.full((72,), 0.3),
                                                      (torch.tensor([1.5, 0.7]), a.clamp_min(0), (-a).clamp_min(0)))
    from delta_kernels import _cpp
    out["simd_level"] = torch.tensor(_cpp.simd_level())
    x = (logp + 0.3).clamp_max(0).requires_grad_()
    for agg in {aggs!r}:
        loss, met = dk.clipped_surrogate_loss(x, logp, adv, mask, agg=agg, backend="cpp")
        grad, = torch.autograd.grad(loss, x)
        out[agg] = torch.cat([loss.reshape(1), met["clip_frac"].reshape(1), met["ppo_kl"].reshape(1), grad.reshape(-1)])
    torch.save(out, sys.argv[1])
""")


def _run_thread_script(tmp_path, threads, simd=None):
    script = tmp_path / "run.py"
    script.write_text(_THREAD_SCRIPT.format(tests=os.path.dirname(__file__), aggs=AGGS))
    path = tmp_path / f"out{threads}{simd}.pt"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("DELTA_KERNELS_CPU_SIMD", None)
    if simd is not None:
        env["DELTA_KERNELS_CPU_SIMD"] = simd
    subprocess.run([sys.executable, str(script), str(path)], check=True, env=env, timeout=300)
    return torch.load(path)


def test_bitwise_identical_for_1_and_2_threads(tmp_path):
    one, two = _run_thread_script(tmp_path, 1), _run_thread_script(tmp_path, 2)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), f"{key} differs between 1 and 2 OpenMP threads"


def test_bitwise_identical_for_avx2_and_baseline(tmp_path):
    """The AVX2 clones of the row passes and the SSE2 baseline give the same bits (no FMA)."""
    fast, base = _run_thread_script(tmp_path, 2), _run_thread_script(tmp_path, 2, simd="baseline")
    assert int(base.pop("simd_level")) == 0
    if int(fast.pop("simd_level")) == 0:
        pytest.skip("no AVX2 on this CPU: only the baseline runs")
    assert fast.keys() == base.keys()
    for key in fast:
        assert torch.equal(fast[key], base[key]), f"{key} differs between the AVX2 and baseline row passes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 67, 203])
def test_row_passes_vs_float64(n, dtype):
    """side_sums / margin_pass on ScaledRows and on plain vectors, every group remainder
    (n mod 4) and an H with a lane tail (H mod 16 != 0), against float64 sums."""
    g = torch.Generator().manual_seed(n)
    H = 37 if n % 2 else 1024
    x = torch.randn(n, H, generator=g).to(dtype)
    scale = torch.rand(n, generator=g)
    adv = torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.2)
    a_pos, a_neg = adv.clamp_min(0), (-adv).clamp_min(0)
    w, c, gamma = torch.randn(H, generator=g), torch.randn(H, generator=g), torch.tensor([1.3, 0.6])
    for v, v64 in ((cpp.ScaledRows(x, scale), scale.double()[:, None] * x.double()), (x, x.double())):
        sums = cpp.side_sums(v, a_pos, a_neg)
        ref = torch.stack([a_pos.double() @ v64, a_neg.double() @ v64])
        assert_rel(sums, ref, 1e-5, "side_sums")
        m_plain, none = cpp.margin_pass(v, w, c, None)
        m, gsums = cpp.margin_pass(v, w, c, (gamma, a_pos, a_neg))
        assert none is None and torch.equal(m, m_plain), "margins differ with and without the gate"
        m_ref = 2 * ((v64 - c.double()) @ w.double())
        assert_rel(m, m_ref, 1e-5, "margins")
        gp, gn = torch.sigmoid(m_ref / 1.3) * a_pos.double(), torch.sigmoid(-m_ref / 0.6) * a_neg.double()
        assert_rel(gsums, torch.stack([gp @ (v64 - c.double()), gn @ (v64 - c.double())]), 1e-5, "gated sums")
