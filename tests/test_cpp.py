"""backend="cpp" (csrc/cpu via delta_kernels._cpp): what only the C++ backend has. The phases
against the float64 reference: tests/test_conformance.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from delta_kernels.aggregation import AGG_MODES as AGGS
from delta_kernels import _backends
from delta_kernels.backends._ops import ops
from delta_kernels.sketch_matrix import sketch_matrix
from helpers import assert_rel

cpp = pytest.importorskip("delta_kernels.backends.cpp")


@pytest.mark.parametrize("hidden_size,sketch_dim,seed", [(1, 1, 0), (3, 5, 1), (64, 16, 12345), (257, 33, 2**32 - 1)])
def test_sketch_matrix_bitwise(hidden_size, sketch_dim, seed):
    native = ops.sketch_matrix.default(hidden_size, sketch_dim, seed)  # the C++ hash (cpp registers the CPU kernel)
    assert torch.equal(native, sketch_matrix(hidden_size, sketch_dim, seed))


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
