"""Fused LM-head kernels against float64 torch with materialised logits.

The backends of the registry with the LM-head op that take CPU tensors here: "torch" (chunked,
with chunks shrunk so small shapes cross every chunk boundary) and "triton" under
TRITON_INTERPRET=1 (its interpreter tile sizes are small for the same reason). Outputs are poisoned (tests/conftest.py).
"""
import math

import pytest
import torch

import delta_kernels
from delta_kernels.fused_linear import (fused_linear_clipped_surrogate_loss, fused_linear_logprob_sketch,
                                        torch_chunked, triton_logprob_grad)
from delta_kernels._backends import LM_HEAD
from delta_kernels.sketch_matrix import sketch_matrix
from backend_cases import cpu_backend_params
from helpers import TOL, assert_rel, rel_err

BACKENDS = cpu_backend_params(LM_HEAD)  # the inputs here are CPU tensors


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks small enough that every test shape spans several of them."""
    monkeypatch.setattr(torch_chunked, "ROWS", 16)
    monkeypatch.setattr(torch_chunked, "COLS", 64)
    monkeypatch.setattr(triton_logprob_grad, "CHUNK_BYTES", 16 * 1024)


def make_lm(n_shape, hdim, vocab, dtype, seed, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n_shape, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) * (scale / math.sqrt(hdim)) * 3
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    y = torch.randint(0, vocab, n_shape, generator=g)
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype), y


def oracle_logits(h, w, b, temperature):
    """float64 materialised logits of the (already rounded) inputs, [..., V]."""
    x = h.double() @ w.double().T
    if b is not None:
        x = x + b.double()
    return x / temperature


def oracle_logprob(h, w, b, y, temperature):
    lsm = torch.log_softmax(oracle_logits(h, w, b, temperature), -1)
    return lsm.gather(-1, y[..., None])[..., 0], -(lsm.exp() * lsm).sum(-1)


# ---------------------------------------------------------------- phase A: logp, entropy, sketch, side sums

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hdim,vocab,sketch_dim,temperature,bias", [
    (37, 48, 300, 24, 0.7, True),
    (20, 16, 97, None, 1.0, False),
    (45, 100, 1000, 40, 1.3, True),
])
def test_logprob_sketch_matches_float64(backend, dtype, n, hdim, vocab, sketch_dim, temperature, bias):
    h, w, b, y = make_lm((n,), hdim, vocab, dtype, seed=n + vocab, bias=bias)
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(n, generator=g)
    adv[:3] = 0
    mask = torch.rand(n, generator=g) > 0.2
    seed = 12345 + n
    logp, ent, vec, sums = fused_linear_logprob_sketch(h, w, y, bias=b, temperature=temperature, sketch_dim=sketch_dim,
                                                       seed=seed, entropy=True, advantages=adv, mask=mask,
                                                       backend=backend)
    ref_logp, ref_ent = oracle_logprob(h, w, b, y, temperature)
    v = -torch.expm1(ref_logp)[:, None] * h.double()
    if sketch_dim is not None:
        v = v @ sketch_matrix(hdim, sketch_dim, seed, dtype=torch.float64)
    pad = ~mask  # outputs at padding are 0 (docs/reliability.md)
    ref_logp, ref_ent, v = ref_logp.masked_fill(pad, 0), ref_ent.masked_fill(pad, 0), v.masked_fill(pad[:, None], 0)
    a_pos = adv.double().clamp_min(0) * mask
    a_neg = (-adv.double()).clamp_min(0) * mask
    tol = TOL[dtype]
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and vec.dtype == dtype
    assert bool((logp <= 0).all())
    assert_rel(logp, ref_logp, tol, "logp")
    assert_rel(ent, ref_ent, tol, "entropy")
    assert_rel(vec, v, tol, "vectors")
    assert_rel(sums, torch.stack([a_pos @ v, a_neg @ v]), tol, "side_sums")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_without_side_sums_batched_shape(backend):
    h, w, b, y = make_lm((3, 7), 24, 130, torch.float32, seed=3)
    logp, ent, vec, sums = fused_linear_logprob_sketch(h, w, y, bias=b, backend=backend)
    ref_logp, _ = oracle_logprob(h, w, b, y, 1.0)
    assert ent is None and sums is None and logp.shape == (3, 7) and vec.shape == (3, 7, 24)
    assert_rel(logp, ref_logp, TOL[torch.float32], "logp")
    assert_rel(vec, -torch.expm1(ref_logp)[..., None] * h.double(), TOL[torch.float32], "vectors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    """Large and all-negative logits: logp <= 0, entropy finite and >= 0 (shift-free form), and
    no worse than float32 torch with materialised logits (the logits themselves lose digits
    in float32 at |x| ~ 2e4, so the float64 comparison is relative to that baseline)."""
    h, w, _, y = make_lm((19,), 32, 200, torch.float32, seed=11, scale=40.0)
    b = torch.full((200,), -1e4) + torch.randn(200, generator=torch.Generator().manual_seed(1))
    logp, ent, _, _ = fused_linear_logprob_sketch(h, w, y, bias=b, temperature=0.5, entropy=True, backend=backend)
    ref_logp, ref_ent = oracle_logprob(h, w, b, y, 0.5)
    lsm32 = torch.log_softmax((h @ w.T + b) / 0.5, -1)
    base_logp, base_ent = lsm32.gather(1, y[:, None])[:, 0], -(lsm32.exp() * lsm32).sum(-1)
    assert bool(torch.isfinite(ent).all()) and bool((logp <= 0).all()) and bool((ent >= 0).all())
    assert rel_err(logp, ref_logp) <= 2 * rel_err(base_logp, ref_logp) + 1e-6
    assert rel_err(ent, ref_ent) <= 2 * rel_err(base_ent, ref_ent) + 1e-6


def test_float16_triton():
    h, w, b, y = make_lm((33,), 40, 150, torch.float16, seed=5)
    logp, ent, vec, _ = fused_linear_logprob_sketch(h, w, y, bias=b, sketch_dim=16, seed=3, entropy=True,
                                                    backend="triton")
    ref_logp, ref_ent = oracle_logprob(h, w, b, y, 1.0)
    assert_rel(logp, ref_logp, TOL[torch.float16], "logp")
    assert_rel(ent, ref_ent, TOL[torch.float16], "entropy")
    z = (-torch.expm1(ref_logp)[:, None] * h.double()) @ sketch_matrix(40, 16, 3, dtype=torch.float64)
    assert_rel(vec, z, TOL[torch.float16], "sketch")


def test_float64_torch_is_exact():
    h, w, b, y = make_lm((25,), 20, 110, torch.float64, seed=9)
    logp, ent, vec, _ = fused_linear_logprob_sketch(h, w, y, bias=b, temperature=0.9, entropy=True)
    ref_logp, ref_ent = oracle_logprob(h, w, b, y, 0.9)
    assert logp.dtype == torch.float64
    assert_rel(logp, ref_logp, 1e-12, "logp")
    assert_rel(ent, ref_ent, 1e-12, "entropy")


def test_triton_is_deterministic():
    h, w, b, y = make_lm((30,), 36, 250, torch.float32, seed=2)
    adv, mask = torch.randn(30), torch.rand(30) > 0.3
    a = fused_linear_logprob_sketch(h, w, y, bias=b, sketch_dim=20, entropy=True, advantages=adv, mask=mask,
                                    backend="triton")
    c = fused_linear_logprob_sketch(h, w, y, bias=b, sketch_dim=20, entropy=True, advantages=adv, mask=mask,
                                    backend="triton")
    for x, z in zip(a, c):
        assert torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_feed_delta_coefficients(backend):
    """Phase A outputs give the coefficients of the reference run on float64 materialised logp."""
    h, w, b, y = make_lm((4, 9), 32, 180, torch.float32, seed=21)
    g = torch.Generator().manual_seed(4)
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.2
    logp, _, vec, sums = fused_linear_logprob_sketch(h, w, y, bias=b, sketch_dim=16, seed=8, advantages=adv,
                                                     mask=mask, backend=backend)
    res = delta_kernels.delta_coefficients(None, logp, adv, mask, vectors=vec, side_sums=sums, sketch_dim=16, seed=8,
                                           backend="torch")
    ref_logp, _ = oracle_logprob(h, w, b, y, 1.0)
    ref = delta_kernels.delta_coefficients(h.double(), ref_logp, adv.double(), mask, sketch_dim=16, seed=8,
                                           backend="torch")
    assert_rel(res.coef, ref.coef, 1e-4, "coef")  # float32 vectors through a few nonlinear steps


# ---------------------------------------------------------------- phase C: surrogate loss and gradients

def oracle_surrogate(h, w, b, y, old_logp, adv, mask, coef, temperature, agg="token-mean"):
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    lsm = torch.log_softmax(oracle_logits(h64, w64, b64, temperature), -1)
    logp = lsm.gather(-1, y[..., None])[..., 0]
    if adv.dim() == 1 and logp.dim() == 2:
        adv = adv[:, None].expand(logp.shape)
    loss, metrics = delta_kernels.clipped_surrogate_loss(logp, old_logp.double(), adv.double(), mask.bool(),
                                                         coef=None if coef is None else coef.double(), agg=agg,
                                                         backend="torch", check_values=False)
    loss.backward()
    return loss.detach(), metrics, logp.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,hdim,vocab,agg,temperature,per_token", [
    ((41,), 48, 300, "token-mean", 0.8, True),
    ((3, 11), 100, 97, "seq-mean-token-mean", 1.0, False),
    ((4, 6), 16, 1000, "seq-mean-token-sum-norm", 1.5, True),
])
def test_surrogate_loss_and_grads_match_float64(backend, dtype, shape, hdim, vocab, agg, temperature, per_token):
    h, w, b, y = make_lm(shape, hdim, vocab, dtype, seed=hdim + vocab)
    g = torch.Generator().manual_seed(31)
    adv = torch.randn(shape if per_token else shape[:1], generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    coef = torch.rand(shape, generator=g) + 0.5
    ref_logp, _ = oracle_logprob(h, w, b, y, temperature)
    old_logp = (ref_logp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp_max(0).float()
    ref = oracle_surrogate(h, w, b, y, old_logp, adv, mask, coef, temperature, agg)

    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    loss, metrics = fused_linear_clipped_surrogate_loss(hh, ww, y, old_logp, adv, mask, coef=coef, bias=bb,
                                                        temperature=temperature, agg=agg, return_logp=True,
                                                        entropy=True, backend=backend)
    loss.backward()
    tol = TOL[dtype]
    assert_rel(loss, ref[0], tol, "loss")
    pad = ~mask  # per-token outputs at padding are 0 (docs/reliability.md)
    assert_rel(metrics["logp"], ref[2].masked_fill(pad, 0), tol, "logp")
    assert_rel(metrics["entropy"], oracle_logprob(h, w, b, y, temperature)[1].masked_fill(pad, 0), tol, "entropy")
    for k in ("clip_frac", "clip_frac_lower", "ppo_kl"):
        # clip decisions sit on thresholds; low precision may flip a token near one
        assert abs(float(metrics[k]) - float(ref[1][k])) <= (1e-6 if dtype == torch.float32 else 0.05), k
    assert hh.grad.dtype == dtype and ww.grad.dtype == dtype and bb.grad.dtype == dtype
    assert_rel(hh.grad, ref[3], tol, "d hidden")
    assert_rel(ww.grad, ref[4], tol, "d weight")
    assert_rel(bb.grad, ref[5], tol, "d bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_give_zero_gradient(backend):
    shape = (3, 10)
    h, w, _, y = make_lm(shape, 24, 150, torch.float32, seed=17, bias=False)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.4
    # near-on-policy so that no valid token is clipped (clipped tokens have zero gradient too)
    old_logp = (oracle_logprob(h, w, None, y, 1.0)[0] + 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
                ).clamp_max(0).float()
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    loss, _ = fused_linear_clipped_surrogate_loss(hh, ww, y, old_logp, adv, mask, backend=backend)
    loss.backward()
    assert bool((hh.grad[~mask] == 0).all())
    assert bool((hh.grad[mask].abs().sum(-1) > 0).all())
    # moving masked tokens' hidden states or targets leaves the loss unchanged
    h2 = h.clone()
    h2[~mask] = torch.randn(int((~mask).sum()), 24, generator=g)
    loss2, _ = fused_linear_clipped_surrogate_loss(h2, w, y, old_logp, adv, mask, backend=backend)
    assert_rel(loss2, loss.detach(), 1e-6, "loss with masked rows changed")
    # all tokens masked: zero gradient everywhere
    hh.grad = None
    ww.grad = None
    loss, _ = fused_linear_clipped_surrogate_loss(hh, ww, y, old_logp, adv, torch.zeros(shape, dtype=torch.bool),
                                                  backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0 and bool((hh.grad == 0).all()) and bool((ww.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_only_hidden_grad(backend):
    h, w, b, y = make_lm((23,), 20, 120, torch.float32, seed=6)
    adv, mask = torch.randn(23), torch.rand(23) > 0.2
    old_logp = oracle_logprob(h, w, b, y, 1.0)[0].float() - 0.1
    hh = h.clone().requires_grad_()
    loss, _ = fused_linear_clipped_surrogate_loss(hh, w, y, old_logp, adv, mask, bias=b, backend=backend)
    loss.backward()
    ref = oracle_surrogate(h, w, b, y, old_logp, adv, mask, None, 1.0)
    assert_rel(hh.grad, ref[3], TOL[torch.float32], "d hidden")


# ---------------------------------------------------------------- bad inputs

def _lm():
    h, w, b, y = make_lm((6,), 8, 30, torch.float32, seed=0)
    return h, w, b, y


@pytest.mark.parametrize("change,exc,match", [
    (dict(targets=torch.tensor([0, 1, 2, 30, 4, 5])), ValueError, r"targets: value 30 at flat index 3 is out of range"),
    (dict(targets=torch.tensor([0, -1, 2, 3, 4, 5])), ValueError, r"targets: value -1"),
    (dict(targets=torch.zeros(6)), TypeError, r"targets: expected int64"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), ValueError, r"targets: shape \[5\]"),
    (dict(weight=torch.randn(30, 9)), ValueError, r"weight: expected \[V, H\] with H = 8"),
    (dict(weight=torch.randn(30, 8, dtype=torch.float64)), TypeError, r"weight: dtype torch.float64 does not match"),
    (dict(weight=torch.randn(30, 8, device="meta")), ValueError, r"weight: a meta tensor"),
    (dict(bias=torch.randn(29)), ValueError, r"bias: expected shape \[30\]"),
    (dict(bias=torch.randn(30).half()), TypeError, r"bias: dtype"),
    (dict(hidden=torch.randn(8)), ValueError, r"hidden: expected \[N, H\]"),
    (dict(hidden=torch.randn(6, 8).int()), TypeError, r"hidden: expected a floating dtype"),
    (dict(temperature=0.0), ValueError, r"temperature: must be a finite number > 0"),
    (dict(temperature=-1.0), ValueError, r"temperature"),
    (dict(temperature=float("nan")), ValueError, r"temperature"),
    (dict(backend="cuda"), ValueError, r"backend: unknown backend 'cuda'"),
    (dict(sketch_dim=0), ValueError, r"sketch_dim: must be >= 1"),
    (dict(seed=-1), ValueError, r"seed"),
    (dict(advantages=torch.randn(6)), ValueError, r"mask: advantages and mask go together"),
    (dict(advantages=torch.randn(5), mask=torch.ones(6, dtype=torch.bool)), ValueError, r"advantages: shape \[5\]"),
    (dict(advantages=torch.randn(6), mask=torch.ones(5, dtype=torch.bool)), ValueError, r"mask: shape \[5\]"),
])
def test_logprob_sketch_bad_inputs(change, exc, match):
    h, w, b, y = _lm()
    args = dict(hidden=h, weight=w, targets=y, bias=b)
    args.update(change)
    with pytest.raises(exc, match=match):
        fused_linear_logprob_sketch(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_non_finite_hidden_named():
    h, w, b, y = _lm()
    h[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"hidden: non-finite value inf at index \[2, 5\]"):
        fused_linear_logprob_sketch(h, w, y, bias=b)
    with pytest.raises(ValueError, match=r"hidden: non-finite"):
        fused_linear_clipped_surrogate_loss(h, w, y, -torch.rand(6), torch.randn(6), torch.ones(6, dtype=torch.bool))


def test_triton_rejects_float64():
    h, w, b, y = make_lm((6,), 8, 30, torch.float64, seed=0)
    with pytest.raises(TypeError, match=r"backend: 'triton' computes in float32"):
        fused_linear_logprob_sketch(h, w, y, backend="triton")


@pytest.mark.parametrize("change,exc,match", [
    (dict(old_logp=-torch.rand(5)), ValueError, r"old_logp: shape \[5\]"),
    (dict(old_logp=torch.full((6,), 0.5)), ValueError, r"old_logp: log-probabilities must be <= 0"),
    (dict(advantages=torch.randn(4)), ValueError, r"advantages: shape \[4\]"),
    (dict(advantages=torch.tensor([1.0, float("nan"), 0, 0, 0, 0])), ValueError, r"advantages: non-finite"),
    (dict(mask=torch.full((6,), 2.0)), ValueError, r"mask: values must be 0 or 1"),
    (dict(coef=torch.rand(7)), ValueError, r"coef: shape \[7\]"),
    (dict(agg="seq-mean-token-sum"), ValueError, r"agg: 'seq-mean-token-sum' aggregates per sequence"),
    (dict(agg="mean"), ValueError, r"agg: unknown aggregation mode"),
    (dict(clip_c=1.0), ValueError, r"clip_c"),
    (dict(temperature=0), ValueError, r"temperature"),
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 99])), ValueError, r"targets: value 99"),
])
def test_surrogate_bad_inputs(change, exc, match):
    h, w, b, y = _lm()
    args = dict(hidden=h, weight=w, targets=y, old_logp=-torch.rand(6), advantages=torch.randn(6),
                mask=torch.ones(6, dtype=torch.bool), bias=b)
    args.update(change)
    pos = [args.pop(k) for k in ("hidden", "weight", "targets", "old_logp", "advantages", "mask")]
    with pytest.raises(exc, match=match):
        fused_linear_clipped_surrogate_loss(*pos, **args)


# ---------------------------------------------------------------- GPU compilation without a GPU

_AOT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from delta_kernels.fused_linear import triton_logprob as lp, triton_logprob_grad as gr
def comp(fn, sig, consts):
    fn = fn if isinstance(fn, triton.runtime.JITFunction) else fn.fn  # under @triton.heuristics
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
tile = {k: v for k, v in lp.TILE.items() if k.startswith("BLOCK")}
for dt in ("bf16", "fp16", "fp32"):
    head = {"h_ptr": "*" + dt, "w_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*i64"}
    comp(lp._logprob_partials_kernel, {**head, "valid_ptr": "*i1", "part_ptr": "*fp32", "N": "i32", "V": "i32",
         "H": "i32", "temperature": "fp32", "n_blocks": "i32", "cols_per_split": "i32", "n_splits": "i32"},
         dict(HAS_BIAS=True, HAS_VALID=True, ENTROPY=True, IEEE=dt == "fp32", UPCAST=False, **tile))
    comp(gr._logprob_grad_logits_kernel, {**head, "lse_ptr": "*fp32", "g_ptr": "*fp32", "valid_ptr": "*i1",
         "dx_ptr": "*" + dt, "N": "i32", "V": "i32", "H": "i32", "temperature": "fp32", "c0": "i32", "width": "i32",
         "n_blocks": "i32"},
         dict(HAS_BIAS=True, HAS_VALID=True, IEEE=dt == "fp32", UPCAST=False, **tile))
print("compiled")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile when they run")
def test_kernels_compile_for_sm90():
    """The interpreter does not compile: build every fused LM-head kernel for sm_90 with the GPU
    tile sizes (no TRITON_INTERPRET), so constructs only the GPU compiler rejects fail here."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
