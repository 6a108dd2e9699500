"""The LM-head gradient sketch (head_gradient_sketch, head_sketch_matrices) and DelTA on its factors
(delta_coefficients / DeltaAccumulator with head_vectors=(u, s)), against float64 oracles: autograd
head gradients for the exact factors, explicit z = u (x) s from head_sketch_matrices for the sketch.
"""
import math

import pytest
import torch

import delta_kernels as dk
from delta_kernels._backends import LM_HEAD
from delta_kernels.fused_linear import torch_chunked
from delta_kernels.head_sketch import VOCAB_SEED_XOR
from delta_kernels.sketch_matrix import sketch_matrix
from backend_cases import cpu_backend_params
from helpers import TOL, assert_rel, rel_err

LM_BACKENDS = cpu_backend_params(LM_HEAD)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(torch_chunked, "ROWS", 16)
    monkeypatch.setattr(torch_chunked, "COLS", 64)


def make_head(shape, hdim, vocab, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hdim, generator=g) + 0.5
    w = torch.randn(vocab, hdim, generator=g) * (2 / math.sqrt(hdim))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    y = torch.randint(0, vocab, shape, generator=g)
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), y


def make_credit(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    mask = torch.rand(*shape, generator=g) > 0.2
    return adv, mask


def explicit_factors(h, w, b, y, temperature, r1, r2, seed):
    """float64 oracle: u = S1^T (e_y - p) / T, s = S2^T h (each exact when its width is None), with
    the [N, V] softmax materialised and the matrices of head_sketch_matrices."""
    h, w = h.double(), w.double()
    x = (h @ w.T + (0 if b is None else b.double())) / temperature
    g = (torch.nn.functional.one_hot(y, w.shape[0]).double() - torch.softmax(x, -1)) / temperature
    s1, s2 = dk.head_sketch_matrices(w.shape[0], w.shape[1], r1 or 1, r2 or 1, seed, dtype=torch.float64)
    return g if r1 is None else g @ s1, h if r2 is None else h @ s2


def kron_rows(u, s):
    """z = u (x) s, flattened row-major: [..., r1 * r2] (the tests materialise it; the library never does)."""
    return (u[..., :, None] * s[..., None, :]).reshape(*u.shape[:-1], -1)


def test_matrices_are_the_documented_hashed_sign_matrices():
    s1, s2 = dk.head_sketch_matrices(50, 12, 5, 7, seed=3)
    assert torch.equal(s1, sketch_matrix(50, 5, 3 ^ VOCAB_SEED_XOR))
    assert torch.equal(s2, sketch_matrix(12, 7, 3))
    a, b = dk.head_sketch_matrices(12, 12, 8, 8, seed=3)  # same shapes: the seeds keep them apart
    assert not torch.equal(a, b)
    assert abs(float((a * b).sum())) < 0.5 * a.numel() * float(a[0, 0] ** 2)


@pytest.mark.parametrize("backend", LM_BACKENDS)
@pytest.mark.parametrize("r1,r2,temperature", [(5, 7, 0.7), (16, 3, 1.0)])
def test_sketched_factors_equal_explicit_float64(backend, r1, r2, temperature):
    h, w, b, y = make_head((3, 13), 40, 150, torch.float32, seed=r1)  # crosses the vocab tiles and splits
    u, s = dk.head_gradient_sketch(h, w, y, vocab_sketch_dim=r1, sketch_dim=r2, seed=11, temperature=temperature,
                                   bias=b, backend=backend)
    ru, rs = explicit_factors(h, w, b, y, temperature, r1, r2, 11)
    assert u.dtype == s.dtype == torch.float32
    assert_rel(u, ru, TOL[torch.float32], "u")
    assert_rel(s, rs, TOL[torch.float32], "s")


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_bfloat16_inputs(backend):
    h, w, b, y = make_head((2, 11), 40, 100, torch.bfloat16, seed=2)
    u, s = dk.head_gradient_sketch(h, w, y, vocab_sketch_dim=8, sketch_dim=4, bias=b, backend=backend)
    ru, rs = explicit_factors(h, w, b, y, 1.0, 8, 4, 0)
    assert u.dtype == torch.float32
    assert_rel(u, ru, TOL[torch.bfloat16], "u")
    assert_rel(s, rs, TOL[torch.bfloat16], "s")


def test_overflowing_logits_are_named():
    h, w, b, y = make_head((5,), 4, 9, torch.float32)
    with pytest.raises(ValueError, match="^temperature: the logits"):
        dk.head_gradient_sketch(h * 1e30, w * 1e30, y, backend="torch")


def test_float64_and_logits_forms_equal_explicit():
    h, w, b, y = make_head((29,), 9, 70)
    for r1, r2 in ((6, 4), (None, None), (None, 4), (6, None)):
        ru, rs = explicit_factors(h, w, b, y, 1.3, r1, r2, 5)
        u, s = dk.head_gradient_sketch(h, w, y, vocab_sketch_dim=r1, sketch_dim=r2, seed=5, temperature=1.3, bias=b,
                                       backend="torch")
        ul, sl = dk.head_gradient_sketch(h, None, y, logits=h @ w.T + b, vocab_sketch_dim=r1, sketch_dim=r2, seed=5,
                                         temperature=1.3)
        for out in (u, ul):
            assert_rel(out, ru, 1e-12, "u")
        for out in (s, sl):
            assert_rel(out, rs, 1e-12, "s")


@pytest.mark.parametrize("k", [0, 1, 2])
def test_exact_factors_reproduce_delta_on_autograd_head_gradients(k):
    shape, temperature = (4, 6), 0.8
    h, w, b, y = make_head(shape, 5, 7, seed=k)
    adv, mask = make_credit(shape, seed=k)
    w = w.requires_grad_()
    logp = torch.log_softmax((h @ w.T + b) / temperature, -1).gather(-1, y[..., None])[..., 0]
    grads = torch.stack([torch.autograd.grad(lp, w, retain_graph=True)[0].reshape(-1) for lp in logp.reshape(-1)])
    logp, w = logp.detach(), w.detach()
    ref = dk.delta_coefficients(None, logp, adv, mask, vectors=grads.reshape(*shape, -1), k=k, backend="torch")
    u, s = dk.head_gradient_sketch(h, w, y, vocab_sketch_dim=None, sketch_dim=None, temperature=temperature, bias=b)
    out = dk.delta_coefficients(None, logp, adv, mask, head_vectors=(u, s), k=k, backend="torch")
    assert (out.coef - ref.coef).abs().max() < 1e-10
    assert (out.weighted_advantages - ref.weighted_advantages).abs().max() < 1e-10
    for name in ("mu_pos", "mu_neg", "W", "b", "gamma_pos", "gamma_neg", "pred", "scale", "n_pos", "n_neg"):
        assert_rel(getattr(out.stats, name), getattr(ref.stats, name), 1e-10, name)


def sketched_case(seed=0):
    shape = (5, 9)
    h, w, b, y = make_head(shape, 24, 60, seed=seed)
    adv, mask = make_credit(shape, seed=seed)
    u, s = dk.head_gradient_sketch(h, w, y, vocab_sketch_dim=6, sketch_dim=8, seed=seed, bias=b, backend="torch")
    logp = torch.log_softmax(h @ w.T + b, -1).gather(-1, y[..., None])[..., 0]
    return u, s, logp, adv, mask


@pytest.mark.parametrize("k", [0, 1, 3])
def test_sketched_factors_equal_delta_on_explicit_z(backend, k):
    u, s, logp, adv, mask = sketched_case(seed=k)
    ref = dk.delta_coefficients(None, logp, adv, mask, vectors=kron_rows(u, s), k=k, backend="torch")
    dtype = torch.float64 if torch.float64 in backend.declaration.dtypes else torch.float32
    dev = backend.device
    args = [t.to(dtype).to(dev) for t in (u, s, logp, adv)]
    out = dk.delta_coefficients(None, args[2], args[3], mask.to(dev), head_vectors=(args[0], args[1]), k=k,
                                backend=backend)
    tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
    assert_rel(out.coef, ref.coef, tol, "coef")
    assert_rel(out.stats.W, ref.stats.W, tol, "W")
    assert_rel(out.stats.pred, ref.stats.pred, tol, "pred")


def test_float32_factors_under_a_shared_offset(backend):
    """u and s sharing a large common component (filler tokens: the same target, similar contexts):
    the factorised float32 margins subtract <C, W> after the bilinear form, and stay as close to the
    float64 reference as float32 DelTA on the explicit z does (docs/design.md)."""
    if torch.float32 not in backend.declaration.dtypes:
        pytest.skip("float32 backends only")
    g = torch.Generator().manual_seed(5)
    u = torch.randn(4, 50, 8, generator=g) + 30.0 * torch.randn(8, generator=g)
    s = torch.randn(4, 50, 16, generator=g) + 300.0 * torch.randn(16, generator=g)
    logp = -torch.rand(4, 50, generator=g) - 0.1
    adv, mask = torch.randn(4, 50, generator=g), torch.rand(4, 50, generator=g) > 0.2
    z = kron_rows(u.double(), s.double())
    for k in (0, 2):
        ref = dk.delta_coefficients(None, logp.double(), adv.double(), mask, vectors=z, k=k, backend="torch")
        dev = backend.device
        out = dk.delta_coefficients(None, logp.to(dev), adv.to(dev), mask.to(dev), head_vectors=(u.to(dev), s.to(dev)),
                                    k=k, backend=backend)
        explicit = dk.delta_coefficients(None, logp.to(dev), adv.to(dev), mask.to(dev), vectors=z.float().to(dev), k=k,
                                         backend=backend)
        assert rel_err(out.coef, ref.coef) <= max(2 * rel_err(explicit.coef, ref.coef), TOL[torch.float32])


def test_padding_is_dont_care():
    u, s, logp, adv, mask = sketched_case(seed=2)
    dirty_u, dirty_s, dirty_logp = u.clone(), s.clone(), logp.clone()
    dirty_u[~mask], dirty_s[~mask], dirty_logp[~mask] = float("nan"), float("inf"), 3.0
    a = dk.delta_coefficients(None, logp, adv, mask, head_vectors=(u, s), k=2, backend="torch")
    b = dk.delta_coefficients(None, dirty_logp, adv, mask, head_vectors=(dirty_u, dirty_s), k=2, backend="torch")
    assert torch.equal(a.coef, b.coef) and torch.equal(a.stats.W, b.stats.W) and torch.equal(a.stats.pred, b.stats.pred)


@pytest.mark.parametrize("early,store", [(False, "device"), (True, "host")])
def test_accumulator_over_micro_batches_equals_one_call(early, store):
    u, s, logp, adv, mask = sketched_case(seed=4)
    ref = dk.delta_coefficients(None, logp, adv, mask, head_vectors=(u, s), k=2, backend="torch")
    acc = dk.DeltaAccumulator(k=2, store=store, backend="torch")
    for rows in (slice(0, 2), slice(2, 5)):
        acc.add(None, logp[rows], mask[rows], head_vectors=(u[rows], s[rows]),
                advantages=adv[rows] if early else None)
    results = acc.finalize(None if early else adv)
    assert_rel(torch.cat([r.coef for r in results]), ref.coef, 1e-12, "coef")
    assert_rel(results[0].stats.W, ref.stats.W, 1e-12, "W")


def test_accumulator_float32_cpp():
    u, s, logp, adv, mask = (t.float() if t.is_floating_point() else t for t in sketched_case(seed=6))
    ref = dk.delta_coefficients(None, logp.double(), adv.double(), mask, vectors=kron_rows(u, s).double(),
                                backend="torch")
    acc = dk.DeltaAccumulator(backend="cpp")
    for rows in (slice(0, 3), slice(3, 5)):
        acc.add(None, logp[rows], mask[rows], head_vectors=(u[rows], s[rows]))
    out = torch.cat([r.coef for r in acc.finalize(adv)])
    assert out.dtype == torch.float32
    assert_rel(out, ref.coef, TOL[torch.float32], "coef")


# ------------------------------------------------------------------------------------ bad input
def test_bad_widths_and_vocabulary():
    h, w, b, y = make_head((6,), 4, 9)
    for kw, name in ((dict(vocab_sketch_dim=0), "vocab_sketch_dim"), (dict(sketch_dim=0), "sketch_dim")):
        with pytest.raises(ValueError, match=f"^{name}: must be >= 1"):
            dk.head_gradient_sketch(h, w, y, **kw)
        with pytest.raises(ValueError, match=f"^{name}: must be >= 1"):
            dk.head_sketch_matrices(9, 4, **{**dict(vocab_sketch_dim=2, sketch_dim=2), **kw})
    with pytest.raises(ValueError, match=r"^vocab_size: .*int32 hash range"):
        dk.head_sketch_matrices(2**31, 4, 2, 2)
    huge = torch.zeros((), dtype=torch.float64).expand(2**31, 4)  # no memory behind it
    with pytest.raises(ValueError, match=r"^weight: .*int32 hash range"):
        dk.head_gradient_sketch(h, huge, y)
    with pytest.raises(ValueError, match=r"^logits: .*int32 hash range"):
        dk.head_gradient_sketch(h, None, y, logits=torch.zeros((), dtype=torch.float64).expand(6, 2**31))
    with pytest.raises(ValueError, match="^logits: pass weight or logits"):
        dk.head_gradient_sketch(h, w, y, logits=h @ w.T)
    with pytest.raises(ValueError, match="^bias: is inside the logits"):
        dk.head_gradient_sketch(h, None, y, logits=h @ w.T, bias=b)
    with pytest.raises(ValueError, match="^logits: shape"):
        dk.head_gradient_sketch(h, None, y, logits=(h @ w.T)[:5])
    with pytest.raises(ValueError, match="^targets: value 9"):
        dk.head_gradient_sketch(h, None, torch.full((6,), 9), logits=h @ w.T)
    with pytest.raises(ValueError, match="^backend: unknown backend 'fast'"):
        dk.head_gradient_sketch(h, None, y, logits=h @ w.T, backend="fast")
    bad = (h @ w.T).clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^logits: non-finite value nan at index \[2, 3\]"):
        dk.head_gradient_sketch(h, None, y, logits=bad)


def test_bad_head_vectors():
    u, s, logp, adv, mask = sketched_case()
    call = dk.delta_coefficients

    def fails(exc, pattern, hidden=None, **kw):
        with pytest.raises(exc, match=pattern):
            call(hidden, logp, adv, mask, **{"head_vectors": (u, s), **kw})

    fails(ValueError, r"^head_vectors: u \[5, 9, 6\] and s \[5, 8, 8\] cover different tokens",
          head_vectors=(u, s[:, :8]))
    fails(ValueError, r"^head_vectors: .*leading dims must equal logp's shape \[5, 9\]",
          head_vectors=(u[:, :8], s[:, :8]))
    fails(ValueError, r"^head_vectors: r1 \(the last dim of u\) must be >= 1", head_vectors=(u[..., :0], s))
    fails(ValueError, r"^head_vectors: r2 \(the last dim of s\) must be >= 1", head_vectors=(u, s[..., :0]))
    fails(TypeError, r"^head_vectors: expected a pair", head_vectors=(u,))
    fails(TypeError, r"^head_vectors: s has dtype torch.float32", head_vectors=(u, s.float()))
    fails(ValueError, r"^hidden: head_vectors replace", hidden=u)
    fails(ValueError, r"^sketch_dim: head_vectors are sketched already", sketch_dim=4)
    fails(ValueError, r"^head_vectors\[0\]: a meta tensor", head_vectors=(u.to("meta"), s))
    nan = u.clone()
    i = int(mask.reshape(-1).nonzero()[3, 0])
    nan.reshape(-1, 6)[i, 2] = float("inf")
    fails(ValueError, r"^head_vectors\[0\]: non-finite value inf", head_vectors=(nan, s))
    acc = dk.DeltaAccumulator(backend="torch")
    with pytest.raises(ValueError, match=r"^add 0: head_vectors: u \[2, 9, 6\] and s \[1, 9, 8\]"):
        acc.add(None, logp[:2], mask[:2], head_vectors=(u[:2], s[:1]))
    acc.add(None, logp[:2], mask[:2], head_vectors=(u[:2], s[:2]))
    with pytest.raises(ValueError, match=r"^add 1: head_vectors: last dim \(5, 8\) differs from add 0's \(6, 8\)"):
        acc.add(None, logp[2:], mask[2:], head_vectors=(u[2:, :, :5], s[2:]))
    with pytest.raises(ValueError, match=r"^add 0: head_vectors: are sketched already"):
        dk.DeltaAccumulator(sketch_dim=4, backend="torch").add(None, logp, mask, head_vectors=(u, s))
