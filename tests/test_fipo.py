"""fipo_weights on every backend against an independent float64 implementation of the FIPO
authors' formula (written out below from docs/design.md, "FIPO"), and the surrogate with FIPO
credit against the authors' future_kl loss written out in float64 and aggregated by verl
0.9.1's own agg_loss, in the four agg modes: values and gradients."""
from __future__ import annotations

import math

import pytest
import torch

import delta_kernels as dk
from backend_cases import backend_params

FIPO = backend_params("fipo_weights")
EPS32 = torch.finfo(torch.float32).eps


def oracle(logp, old, adv, mask, decay_rate=32.0, rho=0.2, high_only=True, safety=10.0, c=10.0):
    """The authors' weights in float64, token by token: (weights, keep, future_kl, S) with
    S_t = sum_k gamma^(k - t) |x_k| (the scale of the float32 rounding bound)."""
    logp, old, adv = (t.double() for t in (logp, old, adv))
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    mask = mask.bool()
    rows, cols = logp.shape
    gamma = 2.0 ** (-1.0 / decay_rate)
    d = torch.where(mask, logp - old, 0.0).clamp(-20, 20)
    x = torch.where(mask & (d <= math.log(c)), d, 0.0)
    fkl, scale = torch.zeros_like(d), torch.zeros_like(d)
    run, run_abs = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    for t in range(cols - 1, -1, -1):
        run = x[:, t] + gamma * run
        run_abs = x[:, t].abs() + gamma * run_abs
        fkl[:, t], scale[:, t] = run, run_abs
    f = torch.exp(fkl)
    f = f.clamp(1.0 if high_only else 1.0 - rho, 1.0 + rho) if rho > 0 else f.clamp(max=10.0)
    a = torch.where(mask, adv, 0.0)
    f = torch.where((a < 0) & (torch.exp(d) > safety), f.clamp(0.8, 1.0), f)
    keep = ((mask & (a < 0) & (torch.exp(d) > c)).sum(1) <= 1)
    return torch.where(mask, f, 0.0), keep, torch.where(mask, fkl, 0.0), scale


def fipo_batch(rows, cols, seed, dtype=torch.float32, pad_nan=True):
    """Log-ratios around 0 with spikes past +-20 and past log c, negative advantages with ratios
    past the safety threshold and c (row 0: one such token, kept; row 1: two, dropped when
    cols >= 4), ~20% padding holding NaN."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3 - 0.5
    logp = (old + 0.3 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).clamp_max(-1e-3)
    spikes = torch.rand(rows, cols, generator=g) < 0.05
    old = torch.where(spikes & (torch.rand(rows, cols, generator=g) < 0.5), logp - 25.0, old)  # D past +20
    logp = torch.where(spikes & (old > logp - 20), old - 24.0, logp)                            # D past -20
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, cols, generator=g) > 0.2
    if cols >= 4 and rows >= 2:
        adv[:2] = -1.0
        mask[:2, :4] = True
        old[0, 1] = logp[0, 1] - 3.0                           # r = e^3 > c: one token, row kept
        old[1, 1], old[1, 3] = logp[1, 1] - 3.0, logp[1, 3] - 2.6  # two tokens: row dropped
        old[0, 2] = logp[0, 2] - 2.0                           # r = e^2: past safety_thresh 4
    logp, old, adv = logp.to(dtype), old.to(dtype), adv.to(dtype)
    if pad_nan:
        logp, old = logp.masked_fill(~mask, float("nan")), old.masked_fill(~mask, float("nan"))
    return logp, old, adv, mask


def check_against_oracle(fw, ref, backend, dtype, cols):
    w_ref, keep_ref, fkl_ref, scale = ref
    assert fw.weights.dtype == fw.future_kl.dtype == dtype and fw.keep.dtype == torch.bool
    assert torch.equal(fw.keep.cpu(), keep_ref)
    if dtype == torch.float64:
        bound_f = 1e-10 * (1 + scale)
    else:  # float32 rounding: the log-ratios (one rounding each), then the scan's, growing with T
        bound_f = EPS32 * (8 + cols) * scale + 2 * EPS32 * fkl_ref.abs()
    err_f = (fw.future_kl.double().cpu() - fkl_ref).abs()
    assert bool((err_f <= bound_f).all()), f"{backend}: future_kl off by {float((err_f - bound_f).max()):.3g}"
    bound_w = w_ref * (bound_f + 4 * (EPS32 if dtype == torch.float32 else 1e-15))
    err_w = (fw.weights.double().cpu() - w_ref).abs()
    assert bool((err_w <= bound_w).all()), f"{backend}: weights off by {float((err_w - bound_w).max()):.3g}"


CASES = [  # (rows, cols, decay_rate, options)
    (3, 1, 32.0, {}),
    (5, 255, 1.0, {}),
    (4, 257, 1000.0, dict(rho=0.2, high_only=False)),
    (3, 520, 32.0, dict(rho=0.0)),
    (4, 300, 7.0, dict(rho=0.5, high_only=True, safety=4.0, c=3.0)),
    (2, 129, 100.0, dict(rho=0.1, high_only=False, safety=1.5, c=20.0)),
]


@pytest.mark.parametrize("backend", FIPO)
@pytest.mark.parametrize("rows,cols,decay,opts", CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(f"{k}{x}" for k, x in v.items()) or "defaults")
def test_fipo_weights_match_float64_formula(backend, rows, cols, decay, opts):
    names = dict(rho="future_kl_clip_ratio", high_only="future_kl_clip_high_only", safety="safety_thresh", c="clip_c")
    kwargs = {names[k]: v for k, v in opts.items()}
    for dtype in ((torch.float64, torch.float32) if torch.float64 in backend.declaration.dtypes else (torch.float32,)):
        logp, old, adv, mask = fipo_batch(rows, cols, seed=rows * cols, dtype=dtype)
        ref = oracle(logp, old, adv, mask, decay, **opts)
        dev = backend.device
        fw = dk.fipo_weights(logp.to(dev), old.to(dev), adv.to(dev), mask.to(dev), decay_rate=decay,
                             backend=str(backend), **kwargs)
        check_against_oracle(fw, ref, backend, dtype, cols)


@pytest.mark.parametrize("backend", FIPO)
@pytest.mark.parametrize("decay", [1.0, 1e4])
def test_log_space_scan_long_rows(backend, decay):
    """T = 32k (4096, 16 chunks, under the interpreter, which runs a scan element by element):
    decay_rate 1e4 (gamma within 7e-5 of 1: a running product of float32 gammas drifts by
    ~T * 3e-8, far past the bound) and 1 (gamma^j underflows to 0 after ~150 tokens)."""
    logp, old, adv, mask = fipo_batch(2, 4096 if backend.interpreted else 32768, seed=7, pad_nan=False)
    old = logp - 0.01 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)).abs()  # no clipping
    ref = oracle(logp, old, adv, mask, decay, rho=0.0)
    fw = dk.fipo_weights(logp, old, adv, mask, decay_rate=decay, future_kl_clip_ratio=0.0, backend=str(backend))
    check_against_oracle(fw, ref, backend, torch.float32, 64)  # the bound of T = 64: no drift with T


@pytest.mark.parametrize("backend", FIPO)
def test_all_padding_gives_zero_weights_kept_rows_and_zero_loss(backend):
    logp = torch.full((3, 7), float("nan"), requires_grad=True)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    fw = dk.fipo_weights(logp, logp.detach(), torch.full((3,), float("nan")), mask, backend=str(backend))
    assert torch.equal(fw.weights, torch.zeros(3, 7)) and bool(fw.keep.all())
    assert torch.equal(fw.future_kl, torch.zeros(3, 7))
    loss, metrics = dk.clipped_surrogate_loss(logp, logp.detach(), torch.zeros(3), mask, credit="fipo",
                                              backend="torch" if str(backend) == "torch" else "auto")
    loss.backward()
    assert all(float(metrics[f"fipo/{k}"]) == 0.0 for k in ("weight_mean", "weight_min", "weight_max",
                                                             "rows_dropped", "clip_frac"))
    assert float(loss.detach()) == 0.0 and torch.equal(logp.grad, torch.zeros(3, 7))


@pytest.mark.parametrize("kwargs,name", [
    (dict(decay_rate=0.0), "decay_rate"), (dict(decay_rate=-2.0), "decay_rate"),
    (dict(decay_rate=float("nan")), "decay_rate"), (dict(clip_c=1.0), "clip_c"),
    (dict(future_kl_clip_ratio=-0.1), "future_kl_clip_ratio"), (dict(safety_thresh=float("inf")), "safety_thresh"),
])
def test_bad_parameters_are_refused_naming_them(kwargs, name):
    logp, old, adv, mask = fipo_batch(2, 5, seed=0)
    with pytest.raises(ValueError, match=f"^{name}: ") as e:
        dk.fipo_weights(logp, old, adv, mask, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages"])
def test_non_finite_values_at_valid_positions_are_refused(which):
    logp, old, adv, mask = fipo_batch(2, 6, seed=1)
    args = dict(logp=logp, old_logp=old, advantages=adv[:, None].expand(2, 6).clone())
    args[which][1, 2] = float("inf")
    with pytest.raises(ValueError, match=f"^{which}: non-finite value inf at index \\[1, 2\\]$"):
        dk.fipo_weights(args["logp"], args["old_logp"], args["advantages"], mask)


def test_shapes_are_checked():
    logp, old, adv, mask = fipo_batch(2, 6, seed=2)
    with pytest.raises(ValueError, match="^logp: FIPO sums over each response"):
        dk.fipo_weights(logp[0], old[0], adv[:1].expand(6), mask[0])
    with pytest.raises(ValueError, match="^old_logp: shape"):
        dk.fipo_weights(logp, old[:, :5], adv, mask)
    with pytest.raises(ValueError, match="^advantages: shape"):
        dk.fipo_weights(logp, old, adv[:1], mask)


# ---- the loss: the authors' future_kl policy loss written out in float64 ----------------------

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 10.0


def authors_loss(logp, old, adv, mask, mode, decay_rate=32.0):
    """compute_policy_loss_future_kl's loss: weighted advantages A f, the dual-clip surrogate,
    rows with > 1 dual-clipped negative tokens dropped from the mask, verl 0.9.1's agg_loss."""
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    d = (logp - old).clamp(-20, 20)
    ratio = torch.exp(d)
    w, _, _, _ = oracle(logp.detach(), old, adv, mask, decay_rate, c=CLIP_C)
    wa = adv * w
    pg1, pg2 = -wa * ratio, -wa * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -wa * CLIP_C
    lower_clipped = (adv < 0) & (clip1 > pg3) & mask
    final = mask & (lower_clipped.sum(1) <= 1)[:, None]
    losses = torch.where(wa < 0, torch.minimum(pg3, clip1), clip1)
    return core_algos.agg_loss(torch.where(final, losses, 0.0), final.double(), mode)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("backend", FIPO)
def test_loss_and_gradient_match_the_authors_loss(mode, backend):
    logp, old, adv, mask = fipo_batch(5, 40, seed=3, dtype=torch.float64, pad_nan=False)
    lp = logp.clone().requires_grad_()
    ref = authors_loss(lp, old, adv, mask, mode)
    ref.backward()
    dtype = torch.float64 if str(backend) == "torch" else torch.float32
    mine = logp.to(dtype).clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(mine, old.to(dtype), adv.to(dtype), mask, credit=dk.credit_spec(
        "fipo"), clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C, agg=mode,
        backend="torch" if dtype == torch.float64 else "auto")
    loss.backward()
    tol = 1e-7 if dtype == torch.float64 else 3e-5
    assert abs(float(loss) - float(ref)) <= tol * abs(float(ref)), (float(loss), float(ref))
    assert float((mine.grad.double() - lp.grad).norm()) <= tol * float(lp.grad.norm())
    assert float(metrics["fipo/rows_dropped"]) == float((~oracle(logp, old, adv, mask, c=CLIP_C)[1]).sum()) >= 1


@pytest.mark.parametrize("backend", [p for p in FIPO if str(p.values[0]) == "triton"])
def test_fipo_credit_adds_one_launch_on_triton(backend):
    """clipped_surrogate_loss(credit="fipo") on triton: every launch counted as the suite counts
    them (Triton kernels and torch ops, tests/launch_counter.py): the plain surrogate's plus one,
    FIPO's kernel (the surrogate's kernel reads the weights and keep and reduces the metrics);
    the backward launches what the plain one does."""
    from launch_counter import LaunchCounter
    from delta_kernels._alloc import poisoned
    logp, old, adv, mask = fipo_batch(3, 40, seed=5, pad_nan=False)
    counts = []
    with poisoned(False):  # the poison fill is a test-only launch
        for credit in (None, "fipo"):
            lp = logp.clone().requires_grad_()
            dk.clipped_surrogate_loss(lp, old, adv, mask, credit=credit, backend="triton", check_values=False)
            with LaunchCounter() as fwd:
                loss, _ = dk.clipped_surrogate_loss(lp, old, adv, mask, credit=credit, backend="triton",
                                                    check_values=False)
            with LaunchCounter() as bwd:
                loss.backward()
            counts.append((fwd, bwd))
    (plain, plain_bwd), (fipo, fipo_bwd) = counts
    assert fipo.launches == plain.launches + 1, (plain.ops, fipo.ops)
    assert fipo.ops - plain.ops == {"triton:_fipo_weights_kernel": 1}, (plain.ops, fipo.ops)
    assert fipo_bwd.ops == plain_bwd.ops, (plain_bwd.ops, fipo_bwd.ops)


FUSED = [p for p in FIPO if str(p.values[0]) in ("cpp", "triton")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cols,extra", [(40, "none"), (37, "coef+is"), (1100, "coef")])
def test_fused_credit_equals_weights_then_surrogate(backend, cols, extra):
    """credit="fipo" on a backend whose surrogate computes FIPO's weights in the same call equals
    fipo_weights followed by the surrogate on mask & keep with coef * weights: loss and gradient
    to the bit (dropped rows, NaN padding, rows past one surrogate tile), the metrics to rounding."""
    if str(backend) == "triton" and cols > 64:
        pytest.skip("a long row under the interpreter: cpp covers the tiles")
    logp, old, adv, mask = fipo_batch(6, cols, seed=11 + cols)
    g = torch.Generator().manual_seed(cols)
    coef = torch.rand(6, cols, generator=g) + 0.5 if "coef" in extra else None
    isw = torch.rand(6, cols, generator=g) + 0.5 if "is" in extra else None
    kw = dict(clip_c=CLIP_C, agg="seq-mean-token-mean", backend=str(backend), check_values=False)
    fused, unfused = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(fused, old, adv, mask, coef=coef, rollout_is_weights=isw, credit="fipo",
                                              **kw)
    loss.backward()
    fw = dk.fipo_weights(logp, old, adv, mask, clip_c=CLIP_C, backend=str(backend), check_values=False)
    assert int((~fw.keep).sum()) >= 1
    ref, ref_metrics = dk.clipped_surrogate_loss(unfused, old, adv, mask & fw.keep[:, None], rollout_is_weights=isw,
                                                 coef=fw.weights if coef is None else coef * fw.weights, **kw)
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(fused.grad, unfused.grad)
    for k, v in ref_metrics.items():
        assert torch.equal(metrics[k], v), k
    w = fw.weights[mask].double()
    for k, v in dict(weight_mean=w.mean(), weight_min=w.min(), weight_max=w.max(),
                     rows_dropped=(~fw.keep).sum().double()).items():
        assert abs(float(metrics[f"fipo/{k}"]) - float(v)) <= 1e-6 * abs(float(v)), (k, metrics)


@pytest.mark.parametrize("op", ["fipo_weights_cpp", "fipo_weights_triton"])
def test_native_ops_pass_opcheck(op):
    """The torch.library ops (schema, fake implementation, dispatch) that torch.compile will see."""
    if op.endswith("triton") and not [p for p in FIPO if str(p.values[0]) == "triton" and not p.marks]:
        pytest.skip("triton does not run here")
    import delta_kernels.backends.cpp  # noqa: F401  (registers the ops)
    import delta_kernels.triton  # noqa: F401
    logp, old, adv, mask = fipo_batch(3, 9, seed=6, pad_nan=False)
    args = (logp, old, adv[:, None].expand(3, 9).contiguous(), mask, 32.0, math.log(10.0), 10.0, 1.0, 1.2, True, 10.0,
            1.2 - 1e-7, 1.0 + 1e-7)
    torch.library.opcheck(getattr(torch.ops.delta_kernels, op), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fused_cpp_op_passes_opcheck():
    """The cpp fused op (FIPO's weights inside the surrogate) as torch.compile sees it."""
    import delta_kernels.backends.cpp  # noqa: F401  (registers the op)
    logp, old, adv, mask = fipo_batch(3, 9, seed=7, pad_nan=False)
    coef = torch.rand(3, 9) + 0.5
    args = (logp, old, adv[:, None].expand(3, 9).contiguous(), mask, coef, None, 32.0, math.log(10.0), 10.0, 1.0,
            1.2, True, 10.0, 1.2 - 1e-7, 1.0 + 1e-7, 0.2, 0.28, 10.0)
    torch.library.opcheck(torch.ops.delta_kernels.fipo_surrogate_cpp, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", FIPO)
@pytest.mark.parametrize("rho", [0.2, 0.0])
def test_metrics_from_the_kernels_row_partials(backend, rho):
    """fipo/* metrics (from each backend's per-row partials) equal the direct reductions of the
    weights over valid tokens; a fully masked row holds NaN and adds nothing."""
    logp, old, adv, mask = fipo_batch(5, 70, seed=8)
    mask[4] = False
    logp[4], old[4] = float("nan"), float("nan")
    spec = dk.credit_spec("fipo", fipo=dict(future_kl_clip_ratio=rho, decay_rate=4.0))
    _, metrics = dk.clipped_surrogate_loss(logp, old, adv, mask, credit=spec, backend=str(backend),
                                           check_values=False)
    fw = dk.fipo_weights(logp, old, adv, mask, future_kl_clip_ratio=rho, decay_rate=4.0, backend=str(backend))
    w = fw.weights[mask].double()
    lower, upper = (0.0, 10.0) if rho == 0 else (1.0, 1.2)
    at = ((fw.weights[mask] >= upper - 1e-7) | (fw.weights[mask] <= lower + 1e-7)).double().mean()
    expect = dict(weight_mean=w.mean(), weight_min=w.min(), weight_max=w.max(), clip_frac=at,
                  rows_dropped=(~fw.keep).sum().double())
    for k, v in expect.items():
        assert abs(float(metrics[f"fipo/{k}"]) - float(v)) <= 1e-6 * max(1.0, abs(float(v))), (k, metrics, expect)
