"""Every registered backend against the float64 reference: the three public phases.

The backends come from the registry (tests/backend_cases.py); a backend under the Triton
interpreter runs a covering subset of the cases (every shape, dtype, k and sketch kind, fewer
combinations). Tolerances: docs/design.md (helpers.TOL).
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import delta_kernels as dk
from delta_kernels import _backends
from delta_kernels._checks import BackendCoefficients
from delta_kernels.aggregation import AGG_MODES
from delta_kernels.coefficients import COUNT_FIELDS
from backend_cases import over_cases
from helpers import TOL, as64, assert_matches_reference, assert_rel, make_flat_or_batched

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)


def _dt(dtype) -> str:
    return {F32: "f32", BF16: "bf16", F16: "f16"}[dtype]


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def inputs(backend, shape, hidden, dtype, seed, seq_level=True):
    return make_flat_or_batched(shape, hidden, dtype, seed, seq_level, device=backend.device)


# ---------------------------------------------------------------- token_sketch

# (token shape, H): N = 1, 7, 129, 1000 tokens with H = 3, 64, 100, 257
GRID_SHAPES = [((1, 1), 3), ((1, 7), 64), ((3, 43), 100), ((8, 125), 257)]
# shape, H, dtype, sketch_dim, seed: the covering list (many tiles, odd r, extreme seeds)
SKETCH_COVER = [((129,), 257, F32, 24, 0), ((3, 43), 100, F32, 129, 2**32 - 1), ((7,), 64, BF16, 16, 12345),
                ((1000,), 3, F32, None, 0), ((3, 43), 257, BF16, None, 0)]
SKETCH_FULL = [(s, h, dt, r, 7) for (s, h), dt, r in itertools.product(GRID_SHAPES, DTYPES, (None, 16))] + SKETCH_COVER


@over_cases("shape,hidden,dtype,sketch_dim,seed", SKETCH_FULL, SKETCH_COVER,
            ids=lambda s, h, dt, r, seed: f"{_shape(s)}xH{h}-{_dt(dt)}-r{r}-seed{seed}")
def test_token_sketch(backend, shape, hidden, dtype, sketch_dim, seed):
    h, logp, _, _ = inputs(backend, shape, hidden, dtype, seed=sum(shape) + hidden)
    out = dk.token_sketch(h, logp, sketch_dim=sketch_dim, seed=seed, backend=backend)
    ref = dk.token_sketch(*as64(h, logp), sketch_dim=sketch_dim, seed=seed, backend="torch")
    assert out.dtype == dtype and out.shape == ref.shape and out.device == h.device
    assert_rel(out, ref, TOL[dtype], "z" if sketch_dim else "v")


def test_token_vectors_accurate_near_zero_logp(backend):
    """1 - exp(logp) for logp -> 0 needs expm1: the relative error per row stays tiny."""
    lp = -torch.logspace(-7, 1, 200, dtype=torch.float64).float().to(backend.device)
    v = dk.token_sketch(torch.ones(200, 16, device=backend.device), lp, backend=backend)[:, 0].double()
    ref = -torch.expm1(lp.double())
    assert float(((v - ref).abs() / ref).max()) < 1e-6


# ---------------------------------------------------------------- delta_coefficients

# shape, H, dtype, k, sketch_dim, seq_level: every N in {1, 7, 129, 1000}, every H in {3, 64, 100,
# 257}, k in {0, 1, 3}, exact and sketched (r below, above and far above H), three dtypes,
# sequence- and token-level advantages
COEF_COVER = [
    ((8, 125), 64, F32, 1, None, True),
    ((3, 43), 257, F32, 3, 24, False),
    ((8, 125), 100, BF16, 1, 64, True),
    ((7,), 3, BF16, 0, None, False),
    ((3, 43), 100, F32, 0, 16, True),
    ((1000,), 257, F32, 3, None, False),
    ((3, 43), 64, BF16, 3, None, True),
    ((1, 1), 3, F32, 1, None, True),
    ((2, 50), 100, F16, 1, 144, False),
]
COEF_COVER = [(*case, hash(case[:2] + case[3:4]) % 1000) for case in COEF_COVER]  # + seed
COEF_FULL = [(s, h, dt, k, r, seq, k + 10 * h) for (s, h), dt, k, r, seq in itertools.product(
    GRID_SHAPES + [((4, 300), 1024)] * torch.cuda.is_available(),  # a GPU runs a large batch too
    (F32, BF16), (0, 1, 3), (None, 8), (True, False))] + COEF_COVER


@over_cases("shape,hidden,dtype,k,sketch_dim,seq_level,seed", COEF_FULL, COEF_COVER,
            ids=lambda s, h, dt, k, r, seq, _: f"{_shape(s)}xH{h}-{_dt(dt)}-k{k}-r{r}-{'seq' if seq else 'tok'}")
def test_delta_coefficients(backend, shape, hidden, dtype, k, sketch_dim, seq_level, seed):
    h, logp, adv, mask = inputs(backend, shape, hidden, dtype, seed, seq_level=seq_level)
    out = dk.delta_coefficients(h, logp, adv, mask, k=k, sketch_dim=sketch_dim, seed=3, backend=backend)
    ref = dk.delta_coefficients(*as64(h, logp, adv, mask), k=k, sketch_dim=sketch_dim, seed=3, backend="torch")
    assert out.coef.device == h.device
    assert_matches_reference(out, ref, TOL[dtype])


@over_cases("dtype,sketch_dim,with_sums", [(F32, None, False), (F32, None, True), (BF16, None, False),
                                            (BF16, None, True), (BF16, 32, True)],
            ids=lambda dt, r, s: f"{_dt(dt)}-r{r}-{'sums' if s else 'nosums'}")
def test_delta_coefficients_from_vectors(backend, dtype, sketch_dim, with_sums):
    h, logp, adv, mask = inputs(backend, (4, 37), 96, dtype, seed=5, seq_level=False)
    v = dk.token_sketch(h, logp, sketch_dim=sketch_dim, seed=3, backend=backend)
    sums = None
    if with_sums:
        a = adv.double() * mask
        sums = torch.stack([(a.clamp_min(0)[..., None] * v.double()).sum((0, 1)),
                            ((-a).clamp_min(0)[..., None] * v.double()).sum((0, 1))]).float()
    out = dk.delta_coefficients(None, logp, adv, mask, vectors=v, side_sums=sums, k=2, backend=backend)
    ref = dk.delta_coefficients(None, *as64(logp, adv, mask), vectors=v.double(),
                                side_sums=None if sums is None else sums.double(), k=2, backend="torch")
    assert_matches_reference(out, ref, TOL[F32])  # the same vectors on both sides: only fp32 arithmetic differs


@pytest.mark.parametrize("sketch_dim", [None, 8])
def test_one_side_empty(backend, sketch_dim):
    h, logp, adv, mask = inputs(backend, (6, 20), 32, F32, seed=1)
    adv = adv.abs() + 0.1  # no negative side
    out = dk.delta_coefficients(h, logp, adv, mask, sketch_dim=sketch_dim, backend=backend)
    assert_matches_reference(out, dk.delta_coefficients(*as64(h, logp, adv, mask), sketch_dim=sketch_dim,
                                                        backend="torch"), TOL[F32])
    assert torch.all(out.stats.mu_neg == 0) and float(out.stats.n_neg) == 0


@pytest.mark.parametrize("sketch_dim", [None, 16])
def test_all_advantages_zero_gives_exactly_one(backend, sketch_dim):
    h, logp, adv, mask = inputs(backend, (5, 11), 24, F32, seed=2)
    out = dk.delta_coefficients(h, logp, torch.zeros_like(adv), mask, sketch_dim=sketch_dim, backend=backend)
    assert torch.equal(out.coef, mask.float())
    assert torch.equal(out.weighted_advantages, torch.zeros_like(out.coef))


@pytest.mark.parametrize("sketch_dim", [None, 8])
def test_stats_field_types(backend, sketch_dim):
    """Every DeltaStats field has the type its docstring states, from the one-shot call and from
    DeltaAccumulator: the compute dtype on the inputs' device, whole numbers in the counts."""
    for dtype in [dt for dt in (torch.float64, F32) if dt in backend.declaration.dtypes]:
        h, logp, adv, mask = inputs(backend, (4, 9), 16, dtype, seed=4)
        acc = dk.DeltaAccumulator(k=1, sketch_dim=sketch_dim, backend=backend)
        acc.add(h, logp, mask)
        for how, res in (("call", dk.delta_coefficients(h, logp, adv, mask, sketch_dim=sketch_dim, backend=backend)),
                         ("accumulator", acc.finalize(adv)[0])):
            for f in dataclasses.fields(dk.DeltaStats):
                value = getattr(res.stats, f.name)
                assert isinstance(value, torch.Tensor) and value.dtype == dtype, (how, dtype, f.name, value)
                if f.name in COUNT_FIELDS:
                    assert value.shape == () and float(value) == round(float(value)), (how, f.name, value)
                assert value.device.type == backend.device, (how, f.name, value.device)
            assert res.stats.n_pos + res.stats.n_neg <= res.stats.n_valid == int(mask.sum()), how



def test_backend_returns_one_typed_result(backend, monkeypatch):
    """The backend's delta_coefficients returns BackendCoefficients (coef, weighted_advantages,
    stats: DeltaStats) on the flat token axis; the public result is it, reshaped like logp."""
    h, logp, adv, mask = inputs(backend, (4, 9), 16, F32, seed=8)
    impl = _backends.resolve(backend, h.device, F32, "delta_coefficients")
    seen = []
    real = impl.delta_coefficients
    monkeypatch.setattr(impl, "delta_coefficients", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    res = dk.delta_coefficients(h, logp, adv, mask, backend=backend)
    (raw,) = seen
    assert type(raw) is BackendCoefficients and type(raw.stats) is dk.DeltaStats
    assert raw.coef.shape == raw.weighted_advantages.shape == (logp.numel(),)
    assert torch.equal(res.weighted_advantages, raw.weighted_advantages.reshape(logp.shape))
    expected = torch.where(mask, adv[:, None] * res.coef, 0.0)
    assert_rel(res.weighted_advantages, expected, 1e-6, "weighted_advantages")

def test_all_masked_gives_zeros(backend):
    h, logp, adv, mask = inputs(backend, (3, 9), 16, F32, seed=3)
    out = dk.delta_coefficients(h, logp, adv, torch.zeros_like(mask), k=3, backend=backend)
    assert torch.equal(out.coef, torch.zeros_like(out.coef))
    assert torch.equal(out.weighted_advantages, torch.zeros_like(out.coef))
    assert all(bool(torch.isfinite(t).all()) for t in vars(out.stats).values())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_token(backend, sign):
    dev = backend.device
    h = torch.randn(1, 5, generator=torch.Generator().manual_seed(6)).to(dev)
    logp, adv, mask = (torch.tensor([-0.7], device=dev), torch.tensor([sign], device=dev),
                       torch.tensor([True], device=dev))
    out = dk.delta_coefficients(h, logp, adv, mask, backend=backend)
    assert_matches_reference(out, dk.delta_coefficients(*as64(h, logp, adv, mask), backend="torch"), TOL[F32])
    assert torch.allclose(out.coef.cpu(), torch.ones(1))


# ---------------------------------------------------------------- clipped_surrogate_loss

def surrogate_inputs(backend, shape, dtype, seed, seq_level=True):
    """logp, old_logp, advantages, mask, coef: ratios spread over both clip bounds, some
    log-ratios beyond the +-20 clamp, ~25% padding."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g) * 2
    old = (lp + 0.3 * torch.randn(shape, generator=g)).clamp_max(0)
    far = torch.rand(shape, generator=g) < 0.1
    old = torch.where(far, -25 * torch.rand(shape, generator=g), old)
    lp = torch.where(torch.rand(shape, generator=g) < 0.05, -30 * torch.rand(shape, generator=g), lp)
    adv = torch.randn(shape[0] if (seq_level and len(shape) == 2) else shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    coef = 0.8 + 0.4 * torch.rand(shape, generator=g)
    dev = backend.device
    return [t.to(dtype).to(dev) for t in (lp, old, adv)] + [mask.to(dev), coef.to(dtype).to(dev)]


def surrogate_pair(backend, lp, old, adv, mask, coef, grad_out=-2.5, **kw):
    """-> ((loss, metrics, d(grad_out loss)/d logp) of ``backend``, the same of the float64 reference)."""
    x = lp.clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(x, old, adv, mask, coef=coef, backend=backend, **kw)
    (grad_out * loss).backward()  # the backward scales by the incoming gradient
    x64 = lp.double().clone().requires_grad_()
    loss64, metrics64 = dk.clipped_surrogate_loss(x64, old.double(), adv.double(), mask,
                                                  coef=None if coef is None else coef.double(), backend="torch", **kw)
    (grad_out * loss64).backward()
    return (loss, metrics, x.grad), (loss64, metrics64, x64.grad)


# shape, dtype, with_coef, seq_level
SURROGATE_COVER = [((5, 37), F32, True, True), ((3, 129), BF16, True, False), ((1, 7), F32, False, False)]
SURROGATE_FULL = [(s, dt, c, True) for s, dt, c in itertools.product(
    [(1, 1), (3, 7), (8, 125), (2, 1500)], (F32, BF16), (False, True))] + SURROGATE_COVER
SURROGATE_ID = (lambda s, dt, c, seq: f"{_shape(s)}-{_dt(dt)}-{'coef' if c else 'nocoef'}-{'seq' if seq else 'tok'}")


@pytest.mark.parametrize("agg", AGG_MODES)
@over_cases("shape,dtype,with_coef,seq_level", SURROGATE_FULL, SURROGATE_COVER, ids=SURROGATE_ID)
def test_clipped_surrogate(backend, shape, dtype, with_coef, seq_level, agg):
    lp, old, adv, mask, coef = surrogate_inputs(backend, shape, dtype, seed=len(agg) + shape[1], seq_level=seq_level)
    (loss, metrics, grad), (loss64, metrics64, grad64) = surrogate_pair(
        backend, lp, old, adv, mask, coef if with_coef else None, agg=agg, clip_c=3.0)
    assert loss.dtype == F32 and loss.shape == () and grad.dtype == dtype
    assert_rel(loss, loss64, TOL[F32], "loss")  # bf16 inputs are exact in float32: fp32 arithmetic only
    assert_rel(grad, grad64, TOL[dtype], "d loss / d logp")
    for name in ("clip_frac", "clip_frac_lower", "ppo_kl"):
        assert metrics[name].dtype == F32
        assert_rel(metrics[name], metrics64[name], TOL[F32], name)
    if lp.numel() > 100 and bool((adv < 0).any()):  # the inputs reach both clips (and test those branches)
        assert metrics64["clip_frac"] > 0 and metrics64["clip_frac_lower"] > 0


@pytest.mark.parametrize("n", [1, 999, 2500])
def test_clipped_surrogate_flat(backend, n):
    """[N] inputs (token-mean), ratios past both clips, the dual clip and the +-20 clamp."""
    lp, old, adv, mask, coef = surrogate_inputs(backend, (n,), F32, seed=n, seq_level=False)
    mask[0] = True
    (loss, metrics, grad), (loss64, metrics64, grad64) = surrogate_pair(backend, lp, old, adv, mask, coef,
                                                                        clip_c=3.0)
    if n > 100:
        assert float(metrics64["clip_frac_lower"]) > 0 and float(metrics64["clip_frac"]) > 0
    assert_rel(loss, loss64, TOL[F32], "loss")
    assert_rel(grad, grad64, TOL[F32], "grad")
    for name in metrics64:
        assert_rel(metrics[name], metrics64[name], TOL[F32], name)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_clipped_surrogate_all_masked(backend, agg):
    lp, old, adv, _, coef = surrogate_inputs(backend, (3, 9), F32, seed=1)
    mask = torch.zeros(3, 9, dtype=torch.bool, device=backend.device)
    (loss, metrics, grad), _ = surrogate_pair(backend, lp, old, adv, mask, coef, agg=agg)
    assert float(loss.detach()) == 0.0 and all(float(m) == 0.0 for m in metrics.values())
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------- determinism, bad inputs

def test_bitwise_repeatable(backend):
    """Two calls give the same bits: coefficients and statistics, loss, metrics and gradient."""
    shape, hidden = ((16, 700), 256) if backend.device == "cuda" else ((6, 50), 100)
    h, lp, adv, mask = inputs(backend, shape, hidden, BF16, seed=8, seq_level=False)
    for sketch_dim in (None, 48):
        a, b = (dk.delta_coefficients(h, lp, adv, mask, k=2, sketch_dim=sketch_dim, backend=backend) for _ in "ab")
        assert torch.equal(a.coef, b.coef)
        for name, t in vars(a.stats).items():
            assert torch.equal(t, getattr(b.stats, name)), name
    old = (lp.float() - 0.2 * torch.rand_like(lp.float())).to(lp.dtype)
    for agg in AGG_MODES:
        runs = []
        for _ in range(2):
            x = lp.clone().requires_grad_()
            loss, metrics = dk.clipped_surrogate_loss(x, old, adv, mask, coef=a.coef, agg=agg, backend=backend)
            loss.backward()
            runs.append((loss.detach(), x.grad, *metrics.values()))
        assert all(torch.equal(p, q) for p, q in zip(*runs)), agg


def test_bad_inputs_raise_naming_the_argument(backend):
    h, lp, adv, mask = inputs(backend, (2, 5), 8, F32, seed=0)
    if torch.float64 not in backend.declaration.dtypes:
        with pytest.raises(TypeError, match="float64"):
            dk.delta_coefficients(h.double(), lp.double(), adv.double(), mask, backend=backend)
    with pytest.raises(ValueError, match="hidden"):
        dk.delta_coefficients(h[:, :4], lp, adv, mask, backend=backend)
    with pytest.raises(ValueError, match="logp"):
        dk.token_sketch(h, lp.abs() + 1, backend=backend)
    with pytest.raises(ValueError, match="sketch_dim"):
        dk.token_sketch(h, lp, sketch_dim=0, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        dk.token_sketch(h, lp, sketch_dim=4, seed=2**32, backend=backend)
    with pytest.raises(ValueError, match="agg"):
        dk.clipped_surrogate_loss(lp[0], lp[0], adv[:1].expand(5), mask[0], agg="seq-mean-token-sum", backend=backend)
    with pytest.raises(ValueError, match="mask"):
        dk.clipped_surrogate_loss(lp, lp, adv, mask[:, :3], backend=backend)
    with pytest.raises(ValueError, match="k"):
        dk.delta_coefficients(h, lp, adv, mask, k=-1, backend=backend)
