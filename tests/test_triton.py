"""backend="triton": what only the Triton backend has (forced tile sizes, the kernels alone, no
[N, H] buffer, the sm_90 compile). The phases against the float64 reference:
tests/test_conformance.py (on the CPU under TRITON_INTERPRET=1)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import delta_kernels as dk
from helpers import TOL, as64, assert_matches_reference, assert_rel, make_flat_or_batched
from launch_counter import LaunchCounter

triton_backend = pytest.importorskip("delta_kernels.triton")
import importlib  # noqa: E402

margin_mod = importlib.import_module("delta_kernels.triton.pass3_margins")  # the module, not the function
row_partials = importlib.import_module("delta_kernels.triton.row_partials")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_multi_tile_groups_and_wide_rows(monkeypatch):
    """Force several tiles per row group (the in-program loops) and the wide-row margin path."""
    monkeypatch.setattr(row_partials, "MAX_GROUPS", 3)
    monkeypatch.setattr(margin_mod, "MAX_BLOCK_D", 64)
    monkeypatch.setattr(margin_mod, "CHUNK_D", 32)
    h, lp, adv, mask = make_flat_or_batched((5, 41), 100, torch.float32, 9, device=DEVICE)
    for sketch_dim in (None, 40):
        out = dk.delta_coefficients(h, lp, adv, mask, k=2, sketch_dim=sketch_dim, backend="triton")
        ref = dk.delta_coefficients(*as64(h, lp, adv), mask, k=2, sketch_dim=sketch_dim, backend="torch")
        assert_matches_reference(out, ref, TOL[torch.float32])


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


class BigOutputs(LaunchCounter):
    """The torch ops (outside the Triton launches) whose output holds at least ``limit`` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.big = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._in_kernel and any(isinstance(t, torch.Tensor) and t.numel() >= self.limit
                                       for t in (out if isinstance(out, (tuple, list)) else (out,))):
            self.big.append(str(func))
        return out


@pytest.mark.parametrize("source", ["exact", "sketch", "vectors"])
def test_strided_rows_read_in_place(monkeypatch, source):
    """A response slice full[:, p:] ([B, T, D], row n = b T + t at b stride_b + t stride_t) is
    read in place by the coefficient passes, fused and unfused: no op makes an [N, D] array,
    and every result equals the contiguous call's bit for bit."""
    from delta_kernels import _checks as C
    fused = importlib.import_module("delta_kernels.triton.fused")
    g = torch.Generator().manual_seed(31)
    b, p, t, d = 3, 4, 11, 24
    full = torch.randn(b, p + t, d, generator=g).to(DEVICE)
    view = full[:, p:]
    assert not view.is_contiguous()
    logp = -torch.rand(b * t, generator=g).to(DEVICE)
    adv = torch.randn(b * t, generator=g).to(DEVICE)
    mask = (torch.rand(b * t, generator=g) > 0.2).to(DEVICE)
    key = "vectors" if source == "vectors" else "hidden"
    sketch_dim = 8 if source == "sketch" else None

    def call(rows):
        batch = C.TokenBatch(shape=(b, t), logp=logp, advantages=adv, mask=mask, **{key: rows})
        return fused.delta_coefficients(batch, C.DeltaConfig(k=2), sketch_dim, 5)

    for unfused in (False, True):
        monkeypatch.setattr(fused, "fused_supported", lambda *a, _u=unfused: not _u)
        with BigOutputs(b * t * d) as ops:
            out = call(view)
        assert not ops.big, ops.big
        ref = call(view.reshape(-1, d).clone())
        assert torch.equal(out.coef, ref.coef), unfused
        assert torch.equal(out.weighted_advantages, ref.weighted_advantages), unfused
        for f in dataclasses.fields(out.stats):
            assert torch.equal(getattr(out.stats, f.name), getattr(ref.stats, f.name)), (unfused, f.name)


@pytest.mark.parametrize("k", [0, 2])
def test_exact_pipeline_keeps_vectors_implicit(monkeypatch, k):
    """From bf16 hidden states, exact mode: v = (1 - exp(logp)) h stays implicit (float32 scale,
    never rounded to bf16), so the coefficients meet the float32 tolerance, and no [N, H] tensor
    is allocated by the backend."""
    h, lp, adv, mask = make_flat_or_batched((6, 47), 100, torch.bfloat16, 21 + k, seq_level=False, device=DEVICE)
    n, hid = h.shape[0] * h.shape[1], h.shape[2]
    shapes = []
    for name in ("pass1_token_vectors", "pass3_margins", "row_partials", "fused"):
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
    assert_matches_reference(out, ref, TOL[torch.float32])
    # the public op still materialises v in hidden's dtype
    v = dk.token_sketch(h, lp, backend="triton")
    assert v.dtype == torch.bfloat16 and v.shape == h.shape


@pytest.mark.parametrize("k", [1, 3])
def test_sketched_pipeline_keeps_z_in_float32(k):
    """From bf16 hidden states, sketched mode: z is kept in float32 inside delta_coefficients, as on
    cpp and cuda (not rounded to bf16), so the coefficients meet the float32 tolerance; the public
    token_sketch still returns z in hidden's dtype."""
    h, lp, adv, mask = make_flat_or_batched((1, 7), 64, torch.bfloat16, 40 + k, seq_level=False, device=DEVICE)
    out = dk.delta_coefficients(h, lp, adv, mask, k=k, sketch_dim=8, backend="triton")
    ref = dk.delta_coefficients(*as64(h, lp, adv), mask, k=k, sketch_dim=8, backend="torch")
    assert_matches_reference(out, ref, TOL[torch.float32])
    assert dk.token_sketch(h, lp, sketch_dim=8, backend="triton").dtype == torch.bfloat16


# ---------------------------------------------------------------- GPU compilation without a GPU

_AOT = r'''
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
tv, mp, su, rp, cen, tem, fin = (importlib.import_module("delta_kernels.triton." + m)
                                 for m in ("pass1_token_vectors", "pass3_margins", "surrogate", "row_partials",
                                           "pass2_centroids", "pass4_temperatures", "pass5_coefficients"))
P = lambda t: "*" + t
def comp(fn, sig, consts):
    fn = fn if isinstance(fn, triton.runtime.JITFunction) else fn.fn  # under @triton.heuristics
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
strides = {"row_len": "i32", "stride_b": "i64", "stride_t": "i32"}  # where the rows of hidden/vectors lie
rows = {"logp_ptr": P("fp32"), "w_pos_ptr": P("fp32"), "w_neg_ptr": P("fp32")}
for dt, fp32 in (("bf16", False), ("fp16", False), ("fp32", True)):
    comp(tv._sketch_rows_kernel, {"h_ptr": P(dt), **rows, "z_ptr": P(dt), "partial_ptr": P("fp32"),
         "weight_ptr": P("fp32"), "n_rows": "i32", "hidden": "i32", "sketch_dim": "i32", "rows_per_group": "i32",
         "seed_mixed": "i32", "scale": "fp32", **strides},
         dict(SPLIT=fp32, IEEE=False, SUMS=True, FROM_ADV=True, BLOCK_M=128, BLOCK_R=128, BLOCK_K=64))
srows = {"scale_ptr": P("fp32"), "w_pos_ptr": P("fp32"), "w_neg_ptr": P("fp32")}
for store, sums in ((True, False), (False, True)):  # token_sketch; the side sums of ScaledRows
    comp(tv._scaled_rows_kernel, {"x_ptr": P("bf16"), **srows, "out_ptr": P("bf16"), "partial_ptr": P("fp32"),
         "weight_ptr": P("fp32"), "n_rows": "i32", "n_cols": "i32", "rows_per_group": "i32", **strides},
         dict(HAS_SCALE=True, STORE=store, SUMS=sums, FROM_ADV=sums, BLOCK_N=16, BLOCK_D=256))
for has_scale, moments, final, temps in ((True, True, False, False), (False, False, True, True)):
    comp(mp._margin_rows_kernel, {"v_ptr": P("bf16"), **{k: P("fp32") for k in ("scale_ptr", "w_ptr", "c_ptr",
         "m_ptr", "gamma_ptr", "a_pos_ptr")}, "a_neg_ptr": P("i1"), "partial_ptr": P("fp32"), "stat_ptr": P("fp32"),
         "n_rows": "i32", "n_cols": "i32", "rows_per_group": "i32", "lam_offset": "fp32", "lam_rise": "fp32",
         "mom_ptr": P("fp32"), "sq_ptr": P("fp32"), "eps": "fp32", **strides},
         dict(HAS_SCALE=has_scale, GATED=True, FROM_ADV=True, TEMPS=temps, MOMENTS=moments, FINAL=final, BLOCK_N=1,
              BLOCK_D=4096, ROW_STAGES=1))
fused = {"m_ptr": P("fp32"), "adv_ptr": P("fp32"), "mask_ptr": P("i1"), "gamma_ptr": P("fp32")}
for sq_out in (False, True):  # without / with a process group
    comp(cen._centroids_kernel, {"partial_ptr": P("fp32"), "n_groups": "i32", "stat_ptr": P("fp32"),
         "n_stat_groups": "i32", "centre_ptr": P("fp32"), "mu_ptr": P("fp32"), "w_ptr": P("fp32"), "c_ptr": P("fp32"),
         **fused, "sq_out_ptr": P("fp32"), "n_cols": "i32", "n_rows": "i32", "eps": "fp32"},
         dict(ABOUT=True, STD=True, SQ_OUT=sq_out, BLOCK_G=32, BLOCK_C=256, BLOCK_R=1024))
for totals, sq_in, sq_out in ((True, False, False), (False, False, True), (True, True, False)):
    comp(tem._temperature_kernel, {"stat_ptr": P("fp32"), "n_groups": "i32", "m_ptr": P("fp32"), "adv_ptr": P("fp32"),
         "mask_ptr": P("i1"), "gamma_ptr": P("fp32"), "totals_ptr": P("fp32"), "sq_in_ptr": P("fp32"),
         "sq_out_ptr": P("fp32"), "n_rows": "i32", "eps": "fp32", "lam_offset": "fp32", "lam_rise": "fp32"},
         dict(TOTALS=totals, SQ_IN=sq_in, SQ_OUT=sq_out, BLOCK_G=32, BLOCK_R=1024))
comp(rp._local_sums_kernel, {"partial_ptr": P("fp32"), "n_groups": "i32", "stat_ptr": P("fp32"),
     "n_stat_groups": "i32", "out_ptr": P("fp32"), "n_cols": "i32"}, dict(BLOCK_G=32, BLOCK_C=256))
comp(fin._final_kernel, {**fused, "stat_ptr": P("fp32"), "n_stat_groups": "i32", "w_ptr": P("fp32"), "c_ptr": P("fp32"),
     "coef_ptr": P("fp32"), "weighted_ptr": P("fp32"), "pred_ptr": P("fp32"), "scalar_ptr": P("fp32"), "n_rows": "i32",
     "n_cols": "i32", "eps": "fp32", "lam_offset": "fp32", "lam_rise": "fp32", "inv_base": "fp32"},
     dict(BLOCK_G=32, BLOCK_R=1024, BLOCK_D=256))
comp(mp._margin_wide_kernel, {"v_ptr": P("bf16"), "scale_ptr": P("fp32"), "w_ptr": P("fp32"), "c_ptr": P("fp32"),
     "m_ptr": P("fp32"), "n_rows": "i32", "n_cols": "i32", **strides}, dict(HAS_SCALE=True, BLOCK_N=4, BLOCK_D=4096))
comp(rp._sum_partials_kernel, {"partial_ptr": P("fp32"), "out_ptr": P("fp32"), "n_groups": "i32", "n_cols": "i32"},
     dict(BLOCK_G=32, BLOCK_C=256))
tok = {"logp_ptr": P("bf16"), "old_ptr": P("bf16"), "adv_ptr": P("bf16"), "mask_ptr": P("u8"), "coef_ptr": P("bf16"),
       "isw_ptr": P("bf16")}
clips = {"lo": "fp32", "hi": "fp32", "clip_c": "fp32"}
credit = {"weight_ptr": P("fp32"), "keep_ptr": P("u8")}
for has_credit in (False, True):
    flags = dict(HAS_COEF=True, HAS_ISW=True, HAS_CREDIT=has_credit, BLOCK=1024)
    comp(su._surrogate_fwd_kernel, {**tok, **credit, "stats_ptr": P("fp32"), "metrics_ptr": P("fp32"),
         "partial_ptr": P("fp32"), "n_rows": "i32", "row_len": "i32", "tiles": "i32", **clips}, flags)
    comp(su._surrogate_bwd_kernel, {**tok, **credit, "row_weight_ptr": P("fp32"), "grad_out_ptr": P("fp32"),
         "grad_ptr": P("bf16"), "n_tokens": "i32", "row_len": "i32", **clips}, flags)
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
