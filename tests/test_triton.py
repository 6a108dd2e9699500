"""backend="triton" against the float64 reference (CPU: under TRITON_INTERPRET=1, small shapes)."""
from __future__ import annotations

import pytest
import torch

import delta_kernels as dk
from delta_kernels.aggregation import AGG_MODES as AGGS
from helpers import TOL, as64, assert_rel, make_batch

triton_backend = pytest.importorskip("delta_kernels.triton")
import importlib  # noqa: E402

margin_mod = importlib.import_module("delta_kernels.triton.margin_pass")  # the module, not the function
row_partials = importlib.import_module("delta_kernels.triton.row_partials")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(shape, hidden, dtype, seed, seq_level=True, **kw):
    """shape (B, T) or (N,) -> hidden, logp, adv, mask on DEVICE."""
    b, t = (1, shape[0]) if len(shape) == 1 else shape
    h, lp, adv, mask = make_batch(b, t, hidden, dtype=dtype, seed=seed, seq_level=seq_level or len(shape) == 1,
                                  device=DEVICE, **kw)
    if len(shape) == 1:
        adv = adv.reshape(1, 1).expand(1, t).contiguous() if adv.dim() == 1 else adv
        h, lp, adv, mask = h[0], lp[0], adv.reshape(-1), mask[0]
        if not seq_level:  # token-level advantages on a flat batch
            g = torch.Generator().manual_seed(seed + 7)
            adv = torch.randn(t, generator=g).to(dtype).to(DEVICE)
    return h, lp, adv, mask


def _compare(out, ref, dtype, check_stats=True):
    tol = TOL[dtype]
    assert out.coef.dtype == torch.float32
    assert_rel(out.coef, ref.coef, tol, "coef")
    assert_rel(out.weighted_advantages, ref.weighted_advantages, tol, "weighted_advantages")
    if not check_stats:
        return
    s, r = out.stats, ref.stats
    for name in ("mu_pos", "mu_neg", "W", "pred"):
        assert_rel(getattr(s, name), getattr(r, name), tol, name)
    scalars = ("gamma_pos", "gamma_neg", "scale", "n_pos", "n_neg", "n_valid")
    assert_rel(torch.stack([getattr(s, n).double() for n in scalars]),
               torch.stack([getattr(r, n).double() for n in scalars]), tol, "scalar stats")


# A covering set: every N in {1, 7, 129, 1000}, every H in {3, 64, 100, 257}, k in {0, 1, 3},
# exact and sketched, float32 / bf16 / fp16, sequence- and token-level advantages.
COEF_CASES = [
    # shape, H, dtype, k, sketch_dim, seq_level
    ((8, 125), 64, torch.float32, 1, None, True),
    ((3, 43), 257, torch.float32, 3, 24, False),
    ((8, 125), 100, torch.bfloat16, 1, 64, True),
    ((7,), 3, torch.bfloat16, 0, None, False),
    ((3, 43), 100, torch.float32, 0, 16, True),
    ((1000,), 257, torch.float32, 3, None, False),
    ((3, 43), 64, torch.bfloat16, 3, None, True),
    ((1, 1), 3, torch.float32, 1, None, True),
    ((2, 50), 100, torch.float16, 1, 144, False),
]


@pytest.mark.parametrize("shape,hidden,dtype,k,sketch_dim,seq_level", COEF_CASES)
def test_coefficients_match_reference(shape, hidden, dtype, k, sketch_dim, seq_level):
    h, lp, adv, mask = _batch(shape, hidden, dtype, seed=hash((shape, hidden, k)) % 1000, seq_level=seq_level)
    out = dk.delta_coefficients(h, lp, adv, mask, k=k, sketch_dim=sketch_dim, seed=11, backend="triton")
    ref = dk.delta_coefficients(*as64(h, lp, adv), mask, k=k, sketch_dim=sketch_dim, seed=11, backend="torch")
    _compare(out, ref, dtype)


@pytest.mark.parametrize("dtype,sketch_dim,with_sums", [(torch.float32, None, False), (torch.bfloat16, 32, True)])
def test_coefficients_from_vectors(dtype, sketch_dim, with_sums):
    h, lp, adv, mask = _batch((4, 33), 100, dtype, seed=5, seq_level=False)
    v = dk.token_sketch(h, lp, sketch_dim=sketch_dim, seed=3, backend="triton")
    sums = None
    if with_sums:
        a = adv.double() * mask
        sums = torch.stack([(a.clamp_min(0)[..., None] * v.double()).sum((0, 1)),
                            ((-a).clamp_min(0)[..., None] * v.double()).sum((0, 1))]).float()
    out = dk.delta_coefficients(None, lp, adv, mask, vectors=v, side_sums=sums, backend="triton")
    ref = dk.delta_coefficients(None, *as64(lp, adv), mask, vectors=v.double(),
                                side_sums=None if sums is None else sums.double(), backend="torch")
    _compare(out, ref, dtype)


def test_multi_tile_groups_and_wide_rows(monkeypatch):
    """Force several tiles per row group (the in-program loops) and the wide-row margin path."""
    monkeypatch.setattr(row_partials, "MAX_GROUPS", 3)
    monkeypatch.setattr(margin_mod, "MAX_BLOCK_D", 64)
    monkeypatch.setattr(margin_mod, "CHUNK_D", 32)
    h, lp, adv, mask = _batch((5, 41), 100, torch.float32, seed=9)
    for sketch_dim in (None, 40):
        out = dk.delta_coefficients(h, lp, adv, mask, k=2, sketch_dim=sketch_dim, backend="triton")
        ref = dk.delta_coefficients(*as64(h, lp, adv), mask, k=2, sketch_dim=sketch_dim, backend="torch")
        _compare(out, ref, torch.float32)


def test_margin_pass_kernel():
    """The pipeline kernel alone: m and the gated sums against float64."""
    g = torch.Generator().manual_seed(2)
    v = torch.randn(77, 33, generator=g).to(DEVICE)
    w, c = torch.randn(33, generator=g).to(DEVICE), torch.randn(33, generator=g).to(DEVICE)
    gamma = torch.tensor([1.5, 0.4], device=DEVICE)
    a_pos, a_neg = torch.rand(77, generator=g).to(DEVICE), torch.rand(77, generator=g).to(DEVICE)
    m, sums = triton_backend.margin_pass(v, w, c, (gamma, a_pos, a_neg))
    m64 = 2 * ((v.double() - c.double()) @ w.double())
    assert_rel(m, m64, 1e-6, "m")
    gp = torch.sigmoid(m64 / 1.5) * a_pos.double()
    gn = torch.sigmoid(-m64 / gamma[1].double()) * a_neg.double()
    vc = v.double() - c.double()
    assert_rel(sums, torch.stack([gp @ vc, gn @ vc]), 1e-6, "gated sums")
    m2, none = triton_backend.margin_pass(v, w, c, None)
    assert none is None and torch.equal(m2, m)


@pytest.mark.parametrize("dtype,d,wide", [(torch.bfloat16, 33, False), (torch.float32, 100, True)])
def test_scaled_rows_passes(monkeypatch, dtype, d, wide):
    """side_sums and margin_pass on ScaledRows(x, scale) against float64 scale[:, None] * x (not
    rounded to x's dtype), every path: whole rows, and wide rows (gated sums in a second read)."""
    if wide:
        monkeypatch.setattr(margin_mod, "MAX_BLOCK_D", 64)
        monkeypatch.setattr(margin_mod, "CHUNK_D", 32)
    g = torch.Generator().manual_seed(4)
    n = 91
    x = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    scale = (0.1 + torch.rand(n, generator=g)).to(DEVICE)
    v = triton_backend.ScaledRows(x, scale)
    v64 = scale.double()[:, None] * x.double()
    w, c = torch.randn(d, generator=g).to(DEVICE), torch.randn(d, generator=g).to(DEVICE)
    gamma = torch.tensor([0.8, 1.7], device=DEVICE)
    a_pos, a_neg = torch.rand(n, generator=g).to(DEVICE), torch.rand(n, generator=g).to(DEVICE)
    sums = triton_backend.side_sums(v, a_pos, a_neg)
    assert_rel(sums, torch.stack([a_pos.double() @ v64, a_neg.double() @ v64]), 1e-6, "side sums")
    m, gsums = triton_backend.margin_pass(v, w, c, (gamma, a_pos, a_neg))
    m64 = 2 * ((v64 - c.double()) @ w.double())
    assert_rel(m, m64, 1e-6, "m")
    gp = torch.sigmoid(m64 / 0.8) * a_pos.double()
    gn = torch.sigmoid(-m64 / 1.7) * a_neg.double()
    assert_rel(gsums, torch.stack([gp @ (v64 - c.double()), gn @ (v64 - c.double())]), 1e-6, "gated sums")
    m2, none = triton_backend.margin_pass(v, w, c, None)
    assert none is None and torch.equal(m2, m)


@pytest.mark.parametrize("k", [0, 2])
def test_exact_pipeline_keeps_vectors_implicit(monkeypatch, k):
    """From bf16 hidden states, exact mode: v = (1 - exp(logp)) h stays implicit (float32 scale,
    never rounded to bf16), so the coefficients meet the float32 tolerance, and no [N, H] tensor
    is allocated by the backend."""
    h, lp, adv, mask = _batch((6, 47), 100, torch.bfloat16, seed=21 + k, seq_level=False)
    n, hid = h.shape[0] * h.shape[1], h.shape[2]
    shapes = []
    for name in ("token_vectors", "margin_pass", "row_partials", "fused"):
        mod = importlib.import_module("delta_kernels.triton." + name)
        real = mod.empty

        def record(*shape, _real=real, **kw):
            shapes.append(tuple(shape))
            return _real(*shape, **kw)
        monkeypatch.setattr(mod, "empty", record)
    out = dk.delta_coefficients(h, lp, adv, mask, k=k, backend="triton")
    assert shapes, "the backend allocated nothing through _alloc.empty"
    assert all(torch.Size(s).numel() < n * hid for s in shapes), shapes
    ref = dk.delta_coefficients(*as64(h, lp, adv), mask, k=k, backend="torch")
    _compare(out, ref, torch.float32)
    # the public op still materialises v in hidden's dtype
    v = dk.token_sketch(h, lp, backend="triton")
    assert v.dtype == torch.bfloat16 and v.shape == h.shape


@pytest.mark.parametrize("dtype,shape,hidden,sketch_dim,seed", [
    (torch.float32, (129,), 257, 24, 0),
    (torch.float32, (3, 43), 100, 129, 2**32 - 1),
    (torch.bfloat16, (7,), 64, 16, 12345),
    (torch.float32, (1000,), 3, None, 0),
    (torch.bfloat16, (3, 43), 257, None, 0),
])
def test_token_sketch_equals_v_times_sketch_matrix(dtype, shape, hidden, sketch_dim, seed):
    h, lp, _, _ = _batch(shape, hidden, dtype, seed=1)
    out = dk.token_sketch(h, lp, sketch_dim=sketch_dim, seed=seed, backend="triton")
    v = -torch.expm1(lp.double())[..., None] * h.double()
    ref = v if sketch_dim is None else v @ dk.sketch_matrix(hidden, sketch_dim, seed, dtype=torch.float64,
                                                            device=DEVICE)
    assert out.dtype == dtype and out.shape == ref.shape
    # bf16 outputs: the rounding to bf16 itself is ~2^-9 relative
    assert_rel(out, ref, TOL[dtype], "z" if sketch_dim else "v")


def test_token_vectors_accurate_near_zero_logp():
    """1 - exp(logp) for logp -> 0 needs expm1: relative error per row stays tiny."""
    lp = -torch.logspace(-7, 1, 200, dtype=torch.float64).float().to(DEVICE)
    h = torch.ones(200, 16, device=DEVICE)
    v = dk.token_sketch(h, lp, backend="triton")[:, 0].double()
    ref = -torch.expm1(lp.double())
    assert ((v - ref).abs() / ref).max() < 1e-6


def test_degenerate_batches():
    h, lp, adv, mask = _batch((4, 20), 64, torch.float32, seed=4)
    # one side empty
    one_side = adv.abs()
    out = dk.delta_coefficients(h, lp, one_side, mask, backend="triton")
    ref = dk.delta_coefficients(*as64(h, lp, one_side), mask, backend="torch")
    _compare(out, ref, torch.float32)
    assert torch.equal(out.stats.mu_neg, torch.zeros_like(out.stats.mu_neg))
    # all advantages zero -> exactly 1 on valid tokens, 0 on masked
    zero = torch.zeros_like(adv)
    for sketch_dim in (None, 16):
        out = dk.delta_coefficients(h, lp, zero, mask, sketch_dim=sketch_dim, backend="triton")
        assert torch.equal(out.coef, mask.float())
    # all tokens masked -> zeros, no NaN
    none = torch.zeros_like(mask)
    out = dk.delta_coefficients(h, lp, adv, none, k=3, backend="triton")
    assert torch.equal(out.coef, torch.zeros_like(out.coef))
    assert torch.equal(out.weighted_advantages, torch.zeros_like(out.coef))
    assert all(torch.isfinite(t).all() for t in vars(out.stats).values())
    # a single token
    out = dk.delta_coefficients(h[:1, :1], lp[:1, :1], adv[:1], torch.ones(1, 1, dtype=torch.bool, device=DEVICE),
                                backend="triton")
    ref = dk.delta_coefficients(*as64(h[:1, :1], lp[:1, :1], adv[:1]),
                                torch.ones(1, 1, dtype=torch.bool, device=DEVICE), backend="torch")
    _compare(out, ref, torch.float32)


def test_bitwise_repeatable():
    h, lp, adv, mask = _batch((6, 50), 100, torch.bfloat16, seed=8, seq_level=False)
    for sketch_dim in (None, 48):
        a = dk.delta_coefficients(h, lp, adv, mask, k=2, sketch_dim=sketch_dim, backend="triton")
        b = dk.delta_coefficients(h, lp, adv, mask, k=2, sketch_dim=sketch_dim, backend="triton")
        assert torch.equal(a.coef, b.coef)
        for n, t in vars(a.stats).items():
            assert torch.equal(t, getattr(b.stats, n)), n
    old = (lp.float() - 0.2 * torch.rand_like(lp.float())).to(lp.dtype)
    for agg in ("token-mean", "seq-mean-token-mean"):
        grads = []
        for _ in range(2):
            x = lp.clone().requires_grad_()
            loss, metrics = dk.clipped_surrogate_loss(x, old, adv, mask, agg=agg, backend="triton")
            loss.backward()
            grads.append((loss.detach(), x.grad, *metrics.values()))
        assert all(torch.equal(p, q) for p, q in zip(*grads))


# ---------------------------------------------------------------- the surrogate

def _surrogate_inputs(shape, dtype, seed, seq_level):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g) * 2
    # ratios spread over the clip bounds, and some log-ratios beyond the +-20 clamp
    old = (lp + 0.3 * torch.randn(shape, generator=g)).clamp_max(0)
    far = torch.rand(shape, generator=g) < 0.1
    old = torch.where(far, -25 * torch.rand(shape, generator=g), old)
    lp = torch.where(torch.rand(shape, generator=g) < 0.05, -30 * torch.rand(shape, generator=g), lp)
    adv = torch.randn(shape[0] if (seq_level and len(shape) == 2) else shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    coef = 0.8 + 0.4 * torch.rand(shape, generator=g)
    return [t.to(dtype).to(DEVICE) for t in (lp, old, adv)] + [mask.to(DEVICE), coef.to(dtype).to(DEVICE)]


def _surrogate_pair(lp, old, adv, mask, coef, **kw):
    x = lp.clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(x, old, adv, mask, coef=coef, backend="triton", **kw)
    loss.backward()
    x64 = lp.double().clone().requires_grad_()
    loss64, metrics64 = dk.clipped_surrogate_loss(x64, old.double(), adv.double(), mask,
                                                  coef=None if coef is None else coef.double(), backend="torch", **kw)
    loss64.backward()
    return (loss, metrics, x.grad), (loss64, metrics64, x64.grad)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype,shape,with_coef,seq_level", [
    (torch.float32, (5, 37), True, True),
    (torch.bfloat16, (3, 129), True, False),
    (torch.float32, (1, 7), False, False),
])
def test_surrogate_matches_reference(agg, dtype, shape, with_coef, seq_level):
    lp, old, adv, mask, coef = _surrogate_inputs(shape, dtype, seed=len(agg) + shape[1], seq_level=seq_level)
    (loss, metrics, grad), (loss64, metrics64, grad64) = _surrogate_pair(
        lp, old, adv, mask, coef if with_coef else None, agg=agg, clip_c=3.0)
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_rel(loss, loss64, tol, "loss")
    assert_rel(grad, grad64, tol, "grad")
    for name in ("clip_frac", "clip_frac_lower", "ppo_kl"):
        assert metrics[name].dtype == torch.float32
        assert_rel(metrics[name], metrics64[name], tol, name)
    if lp.numel() > 100:  # the inputs reach both clips (and so test those branches)
        assert metrics64["clip_frac"] > 0 and metrics64["clip_frac_lower"] > 0


@pytest.mark.parametrize("n", [1, 1000, 2500])
def test_surrogate_flat_token_mean(n):
    lp, old, adv, mask, coef = _surrogate_inputs((n,), torch.float32, seed=n, seq_level=False)
    mask[0] = True
    (loss, metrics, grad), (loss64, metrics64, grad64) = _surrogate_pair(lp, old, adv, mask, coef)
    assert_rel(loss, loss64, TOL[torch.float32], "loss")
    assert_rel(grad, grad64, TOL[torch.float32], "grad")
    assert_rel(torch.stack(list(metrics.values())), torch.stack(list(metrics64.values())), TOL[torch.float32], "metrics")


@pytest.mark.parametrize("agg", AGGS)
def test_surrogate_all_masked(agg):
    lp, old, adv, _, coef = _surrogate_inputs((3, 9), torch.float32, seed=1, seq_level=True)
    mask = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    (loss, metrics, grad), _ = _surrogate_pair(lp, old, adv, mask, coef, agg=agg)
    assert float(loss.detach()) == 0.0 and all(float(m) == 0.0 for m in metrics.values())
    assert torch.equal(grad, torch.zeros_like(grad))


def test_surrogate_grad_out_scaling():
    """The backward multiplies by the incoming gradient (not assumed to be 1)."""
    lp, old, adv, mask, coef = _surrogate_inputs((4, 30), torch.float32, seed=3, seq_level=True)
    x = lp.clone().requires_grad_()
    loss, _ = dk.clipped_surrogate_loss(x, old, adv, mask, coef=coef, agg="seq-mean-token-mean", backend="triton")
    (-2.5 * loss).backward()
    x64 = lp.double().clone().requires_grad_()
    loss64, _ = dk.clipped_surrogate_loss(x64, old.double(), adv.double(), mask, coef=coef.double(),
                                          agg="seq-mean-token-mean", backend="torch")
    (-2.5 * loss64).backward()
    assert_rel(x.grad, x64.grad, TOL[torch.float32], "grad")


# ---------------------------------------------------------------- bad inputs reach no kernel

def test_bad_inputs_raise():
    h, lp, adv, mask = _batch((2, 5), 8, torch.float32, seed=0)
    with pytest.raises(TypeError, match="float64"):
        dk.delta_coefficients(h.double(), lp.double(), adv.double(), mask, backend="triton")
    with pytest.raises(ValueError, match="hidden"):
        dk.delta_coefficients(h[:, :4], lp, adv, mask, backend="triton")
    with pytest.raises(ValueError, match="logp"):
        dk.token_sketch(h, lp.abs() + 1, backend="triton")
    with pytest.raises(ValueError, match="sketch_dim"):
        dk.token_sketch(h, lp, sketch_dim=0, backend="triton")
    with pytest.raises(ValueError, match="seed"):
        dk.token_sketch(h, lp, sketch_dim=4, seed=2**32, backend="triton")
    with pytest.raises(ValueError, match="agg"):
        dk.clipped_surrogate_loss(lp[0], lp[0], adv[:1].expand(5), mask[0], agg="seq-mean-token-sum",
                                  backend="triton")
    with pytest.raises(ValueError, match="mask"):
        dk.clipped_surrogate_loss(lp, lp, adv, mask[:, :3], backend="triton")
    with pytest.raises(ValueError, match="k"):
        dk.delta_coefficients(h, lp, adv, mask, k=-1, backend="triton")


# ---------------------------------------------------------------- GPU compilation without a GPU

_AOT = r'''
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
tv, mp, su, rp, fin = (importlib.import_module("delta_kernels.triton." + m)
                       for m in ("token_vectors", "margin_pass", "surrogate", "row_partials", "finalize"))
P = lambda t: "*" + t
def comp(fn, sig, consts):
    fn = fn if isinstance(fn, triton.runtime.JITFunction) else fn.fn  # under @triton.heuristics
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
rows = {"logp_ptr": P("fp32"), "w_pos_ptr": P("fp32"), "w_neg_ptr": P("fp32")}
for dt, fp32 in (("bf16", False), ("fp16", False), ("fp32", True)):
    comp(tv._sketch_rows_kernel, {"h_ptr": P(dt), **rows, "z_ptr": P(dt), "partial_ptr": P("fp32"),
         "weight_ptr": P("fp32"), "n_rows": "i32", "hidden": "i32", "sketch_dim": "i32", "rows_per_group": "i32",
         "seed_mixed": "i32", "scale": "fp32"},
         dict(SPLIT=fp32, IEEE=False, SUMS=True, FROM_ADV=True, BLOCK_M=128, BLOCK_R=128, BLOCK_K=64))
srows = {"scale_ptr": P("fp32"), "w_pos_ptr": P("fp32"), "w_neg_ptr": P("fp32")}
for store, sums in ((True, False), (False, True)):  # token_sketch; the side sums of ScaledRows
    comp(tv._scaled_rows_kernel, {"x_ptr": P("bf16"), **srows, "out_ptr": P("bf16"), "partial_ptr": P("fp32"),
         "weight_ptr": P("fp32"), "n_rows": "i32", "n_cols": "i32", "rows_per_group": "i32"},
         dict(HAS_SCALE=True, STORE=store, SUMS=sums, FROM_ADV=sums, BLOCK_N=16, BLOCK_D=256))
for has_scale, moments, final in ((True, True, False), (False, False, True)):
    comp(mp._margin_rows_kernel, {"v_ptr": P("bf16"), **{k: P("fp32") for k in ("scale_ptr", "w_ptr", "c_ptr",
         "m_ptr", "gamma_ptr", "a_pos_ptr")}, "a_neg_ptr": P("i1"), "partial_ptr": P("fp32"), "stat_ptr": P("fp32"),
         "n_rows": "i32", "n_cols": "i32", "rows_per_group": "i32", "lam_offset": "fp32", "lam_rise": "fp32"},
         dict(HAS_SCALE=has_scale, GATED=True, FROM_ADV=True, MOMENTS=moments, FINAL=final, BLOCK_N=1,
              BLOCK_D=4096, ROW_STAGES=1))
fused = {"m_ptr": P("fp32"), "adv_ptr": P("fp32"), "mask_ptr": P("i1"), "gamma_ptr": P("fp32")}
comp(fin._centroids_kernel, {"partial_ptr": P("fp32"), "n_groups": "i32", "stat_ptr": P("fp32"), "n_stat_groups": "i32",
     "centre_ptr": P("fp32"), "mu_ptr": P("fp32"), "w_ptr": P("fp32"), "c_ptr": P("fp32"), **fused, "n_cols": "i32",
     "n_rows": "i32", "eps": "fp32"}, dict(ABOUT=True, STD=True, BLOCK_G=32, BLOCK_C=256, BLOCK_R=1024))
comp(fin._temperature_kernel, {"stat_ptr": P("fp32"), "n_groups": "i32", "m_ptr": P("fp32"), "adv_ptr": P("fp32"),
     "mask_ptr": P("i1"), "gamma_ptr": P("fp32"), "totals_ptr": P("fp32"), "n_rows": "i32", "eps": "fp32",
     "lam_offset": "fp32", "lam_rise": "fp32"}, dict(TOTALS=True, BLOCK_G=32, BLOCK_R=1024))
comp(fin._final_kernel, {**fused, "stat_ptr": P("fp32"), "n_stat_groups": "i32", "w_ptr": P("fp32"), "c_ptr": P("fp32"),
     "coef_ptr": P("fp32"), "weighted_ptr": P("fp32"), "pred_ptr": P("fp32"), "scalar_ptr": P("fp32"), "n_rows": "i32",
     "n_cols": "i32", "eps": "fp32", "lam_offset": "fp32", "lam_rise": "fp32", "inv_base": "fp32"},
     dict(BLOCK_G=32, BLOCK_R=1024, BLOCK_D=256))
comp(mp._margin_wide_kernel, {"v_ptr": P("bf16"), "scale_ptr": P("fp32"), "w_ptr": P("fp32"), "c_ptr": P("fp32"),
     "m_ptr": P("fp32"), "n_rows": "i32", "n_cols": "i32"}, dict(HAS_SCALE=True, BLOCK_N=4, BLOCK_D=4096))
comp(rp._sum_partials_kernel, {"partial_ptr": P("fp32"), "out_ptr": P("fp32"), "n_groups": "i32", "n_cols": "i32"},
     dict(BLOCK_G=32, BLOCK_C=256))
tok = {"logp_ptr": P("bf16"), "old_ptr": P("bf16"), "adv_ptr": P("bf16"), "mask_ptr": P("u8"), "coef_ptr": P("bf16"),
       "isw_ptr": P("bf16")}
clips = {"lo": "fp32", "hi": "fp32", "clip_c": "fp32"}
flags = dict(HAS_COEF=True, HAS_ISW=True, BLOCK=1024)
comp(su._surrogate_fwd_kernel, {**tok, "partial_ptr": P("fp32"), "row_len": "i32", "tiles": "i32", **clips}, flags)
comp(su._surrogate_bwd_kernel, {**tok, "row_weight_ptr": P("fp32"), "grad_out_ptr": P("fp32"), "grad_ptr": P("bf16"),
     "n_tokens": "i32", "row_len": "i32", **clips}, flags)
print("compiled")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles and runs every kernel itself")
def test_kernels_compile_for_sm90():
    """The interpreter does not compile: build every kernel for sm_90 ahead of time (ptxas ships
    with triton), so a construct only the GPU compiler rejects fails here too."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run compiles and runs every kernel itself")
def test_sketch_kernels_do_not_spill(tmp_path):
    """Every sketch variant the library launches (bf16, fp16 and float32 h, with and without the
    side sums, at N = 65,536, H = 4,096) compiles for sm_90 and sm_80 without register spills
    (benchmarks/aot_table.py traces the launches and reads ptxas)."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "benchmarks/aot_table.py", "--arch", "90", "80", "--match", "_sketch_rows",
                          "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for arch in (90, 80):
        rows = json.loads((tmp_path / f"aot_sm{arch}.json").read_text())["rows"]
        assert {("SPLIT=True" in r["variant"], "SUMS=True" in r["variant"]) for r in rows} == \
            {(a, b) for a in (True, False) for b in (True, False)}
        for r in rows:
            assert "error" not in r and r["spill_stores"] == 0 and r["spill_loads"] == 0, (arch, r)
