"""The aggregation module without verl: data-parallel invariance, padding is don't-care on every
backend, bad normalisers and weights named, and TRL 1.16's loss types through the mapping."""
from __future__ import annotations

import pytest
import torch

import delta_kernels as dk
from delta_kernels._backends import LM_HEAD
from delta_kernels.aggregation import AGG_MODES, SEQUENCE_MODES, trl_loss_aggregation
from backend_cases import backend_dtype_params, backend_params
from helpers import assert_rel

BACKENDS = backend_dtype_params()


def batch(seed, shape=(6, 11), dtype=torch.float64):
    """Fresh inputs with ~30% padding and a fully masked row (row 1)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 0.05
    logp = (old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp_max(-1e-3)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    coef = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    isw = 0.3 + torch.rand(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.3
    mask[1] = False
    return [t.to(dtype) for t in (logp, old, adv, coef, isw)] + [mask]


def loss_and_grad(logp, *args, **kw):
    """-> (loss, metrics, d loss / d logp) on the CPU; the inputs go to the backend's device."""
    backend = kw.get("backend")
    dev = getattr(backend, "device", "cpu")
    to = (lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t)  # noqa: E731
    x = logp.clone().to(dev).requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(x, *map(to, args), **{k: to(v) for k, v in kw.items()})
    loss.backward()
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, x.grad.cpu()


# ---------------------------------------------------------------- data-parallel invariance

@pytest.mark.parametrize("mode", AGG_MODES)
def test_dp_split_equals_whole_batch(mode):
    """Two ranks with dp_size=2 and the global counts: the mean of their losses and of their
    gradients (DDP's all-reduce) equals one process on the whole batch."""
    logp, old, adv, coef, isw, mask = batch(seed=3)
    kw = dict(agg=mode, loss_scale_factor=11, backend="torch")
    whole, _, grad = loss_and_grad(logp, old, adv, mask, coef=coef, rollout_is_weights=isw, **kw)
    counts = dict(batch_num_tokens=int(mask.sum()), global_batch_size=int(mask.any(-1).sum()))
    halves = [slice(0, 2), slice(2, 6)]  # unequal ranks, one holding the empty row
    parts = [loss_and_grad(logp[s], old[s], adv[s], mask[s], coef=coef[s], rollout_is_weights=isw[s], dp_size=2,
                           **counts, **kw) for s in halves]
    assert_rel(sum(p[0] for p in parts) / 2, whole, 1e-12, "loss")
    assert_rel(torch.cat([p[2] for p in parts]) / 2, grad, 1e-12, "grad")


def test_local_token_mean_of_micro_batches_is_not_the_batch_token_mean():
    """The issue's case: averaging per-micro-batch token-means differs; batch_num_tokens fixes it."""
    logp, old, adv, coef, _, mask = batch(seed=5)
    whole = dk.clipped_surrogate_loss(logp, old, adv, mask, backend="torch")[0]
    halves = [slice(0, 2), slice(2, 6)]
    local = sum(dk.clipped_surrogate_loss(logp[s], old[s], adv[s], mask[s], backend="torch")[0] for s in halves) / 2
    fixed = sum(dk.clipped_surrogate_loss(logp[s], old[s], adv[s], mask[s], dp_size=2, backend="torch",
                                          batch_num_tokens=int(mask.sum()))[0] for s in halves) / 2
    assert abs(float(local - whole)) > 1e-3
    assert float(fixed) == pytest.approx(float(whole), rel=1e-12)


# ---------------------------------------------------------------- padding is don't-care

@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_padding_is_never_read(backend, dtype, mode):
    """NaN, inf and positive log-probs at masked positions change nothing (bitwise) and the
    gradient there is exactly 0."""
    logp, old, adv, coef, isw, mask = batch(seed=len(mode), dtype=dtype)
    kw = dict(agg=mode, backend=backend, check_values=False)
    clean = loss_and_grad(logp, old, adv, mask, coef=coef, rollout_is_weights=isw, **kw)
    pad = ~mask
    dirty = [t.clone() for t in (logp, old, adv, coef, isw)]
    for t, value in zip(dirty, (float("nan"), float("inf"), float("nan"), -float("inf"), float("nan"))):
        t[pad] = value
    dirty[0][0][pad[0]] = 3.0  # positive log-probs in row 0's padding
    out = loss_and_grad(dirty[0], dirty[1], dirty[2], mask, coef=dirty[3], rollout_is_weights=dirty[4], **kw)
    assert torch.equal(out[0], clean[0])
    assert all(torch.equal(out[1][k], clean[1][k]) for k in clean[1])
    assert torch.equal(out[2], clean[2])
    assert bool((out[2][pad] == 0).all()) and bool(torch.isfinite(out[2]).all())


@pytest.mark.parametrize("backend", backend_params(LM_HEAD))
def test_fused_padding_is_never_read(backend):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 5, 16, generator=g), torch.randn(40, 16, generator=g) * 0.3
    y = torch.randint(0, 40, (3, 5), generator=g)
    _, old, adv, coef, isw, mask = batch(seed=1, shape=(3, 5), dtype=torch.float32)
    dev = backend.device
    runs = []
    for poison in (False, True):
        args = [t.clone() for t in (old, adv, coef, isw)]
        if poison:
            for t in args:
                t[~mask] = float("nan")
        hh = h.clone().to(dev).requires_grad_()
        args = [t.to(dev) for t in args]
        loss, _ = dk.fused_linear_clipped_surrogate_loss(hh, w.to(dev), y.to(dev), args[0], args[1], mask.to(dev),
                                                         coef=args[2], rollout_is_weights=args[3],
                                                         agg="seq-mean-token-mean", backend=backend,
                                                         check_values=False)
        loss.backward()
        runs.append((loss.detach().cpu(), hh.grad.cpu()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert bool((runs[1][1][~mask] == 0).all())


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0,)])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_empty_batches_give_zero(backend, dtype, shape):
    """No rows or no tokens: loss and metrics 0, a zero gradient of logp's shape (verl: 0 / 0)."""
    modes = AGG_MODES if len(shape) == 2 else [m for m in AGG_MODES if m not in SEQUENCE_MODES]
    z = torch.zeros(shape, dtype=dtype)
    for mode in modes:
        loss, metrics, grad = loss_and_grad(z, z, z, torch.zeros(shape, dtype=torch.bool), agg=mode, backend=backend)
        assert float(loss) == 0 and all(float(v) == 0 for v in metrics.values()), mode
        assert grad.shape == z.shape


def test_value_checks_ignore_padding_of_the_weights():
    """coef and rollout_is_weights are checked for finiteness at valid positions only."""
    logp, old, adv, coef, isw, mask = batch(seed=2)
    coef[~mask], isw[~mask] = float("nan"), float("inf")
    loss, _ = dk.clipped_surrogate_loss(logp, old, adv, mask, coef=coef, rollout_is_weights=isw, backend="torch")
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- bad input is named

def _bad(match, exc=ValueError, **kw):
    logp, old, adv, coef, isw, mask = batch(seed=4)
    with pytest.raises(exc, match=match):
        dk.clipped_surrogate_loss(logp, old, adv, mask, backend="torch", **kw)
    h, w, y = torch.randn(6, 11, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64), \
        torch.randint(0, 9, (6, 11))
    with pytest.raises(exc, match=match):
        dk.fused_linear_clipped_surrogate_loss(h, w, y, old, adv, mask, backend="torch", **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(agg="seq-mean"), r"^agg: unknown aggregation mode 'seq-mean'"),
    (dict(dp_size=0), r"^dp_size: must be >= 1"),
    (dict(batch_num_tokens=-3), r"^batch_num_tokens: must be a finite number > 0"),
    (dict(batch_num_tokens=0), r"^batch_num_tokens: must be a finite number > 0"),
    (dict(global_batch_size=-1, agg="seq-mean-token-mean"), r"^global_batch_size: must be a finite number > 0"),
    (dict(loss_scale_factor=float("nan")), r"^loss_scale_factor: must be a finite number > 0"),
    (dict(dp_size=2), r"^batch_num_tokens: the global count is required when dp_size > 1"),
    (dict(dp_size=2, rollout_is_weights=torch.ones(6, 10, dtype=torch.float64), batch_num_tokens=5),
     r"^rollout_is_weights: shape \[6, 10\]"),
] + [(dict(dp_size=2, agg=m, batch_num_tokens=40), r"^global_batch_size: the global count is required")
     for m in SEQUENCE_MODES])
def test_bad_aggregation_arguments(kw, match):
    _bad(match, **kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dp_size=1.5), TypeError, r"^dp_size: expected an int"),
    (dict(dp_size=True), TypeError, r"^dp_size: expected an int"),
    (dict(batch_num_tokens="40"), TypeError, r"^batch_num_tokens: expected a number"),
    (dict(rollout_is_weights=torch.ones(6, 11, dtype=torch.int64)), TypeError,
     r"^rollout_is_weights: expected a float"),
])
def test_bad_aggregation_types(kw, exc, match):
    _bad(match, exc, **kw)


def test_non_finite_weight_at_a_valid_token_is_named():
    _, _, _, _, isw, mask = batch(seed=4)
    first = tuple(int(i) for i in mask.nonzero()[0])
    isw[first] = float("inf")
    _bad(r"^rollout_is_weights: non-finite value inf at index " + str(list(first)).replace("[", r"\[")
         .replace("]", r"\]"), rollout_is_weights=isw)


def test_token_sum_needs_no_global_count():
    logp, old, adv, _, _, mask = batch(seed=6)
    a = dk.clipped_surrogate_loss(logp, old, adv, mask, agg="token-sum", dp_size=2, backend="torch")[0]
    b = dk.clipped_surrogate_loss(logp, old, adv, mask, agg="token-sum", backend="torch")[0]
    assert float(a) == pytest.approx(2 * float(b), rel=1e-14)


# ---------------------------------------------------------------- TRL 1.16 loss types

def trl_hand_case():
    """[3, 4] completions, one advantage per sequence (TRL's shape), row 2 fully masked."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, -2.2, -0.1], [-1.0, -1.0, -1.0, -1.0]],
                       dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.6, 1.0, 1.1], [0.9, 1.3, 0.7, 1.05], [2.0, 0.5, 1.0, 1.0]], dtype=torch.float64)
    logp = old + ratio.log()
    adv = torch.tensor([0.8, -1.3, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def trl_reference(loss_type, logp, old, adv, mask, eps_low, eps_high, gas, num_items, num_processes, spg,
                  max_len, training):
    """TRL 1.16 GRPOTrainer._compute_loss (token-level importance sampling, beta 0, no masks
    beyond the completion mask), written out for the hand case."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    m = mask.double()
    normalizer = gas if training else 1.0
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / normalizer
    if loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0) / normalizer
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len) / normalizer
    items = torch.tensor(float(num_items)).clamp(min=1.0) / num_processes
    if training:
        items = items * gas / spg
    return (per_token_loss * m).sum() / items  # dapo


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_trl_loss_types(loss_type, training):
    logp, old, adv, mask = trl_hand_case()
    setup = dict(gradient_accumulation_steps=2, num_items_in_batch=37, num_processes=2, steps_per_generation=4,
                 max_completion_length=6)
    kw = trl_loss_aggregation(loss_type, mask, training=training, **setup)
    ours = dk.clipped_surrogate_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=1e6, backend="torch",
                                     **kw)[0]
    ref = trl_reference(loss_type, logp, old, adv, mask, 0.2, 0.28, 2, 37, 2, 4, 6, training)
    assert float(ours) == pytest.approx(float(ref), rel=1e-12)


def test_trl_mapping_is_documented_and_checked():
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert trl_loss_aggregation("grpo", mask, gradient_accumulation_steps=3)["agg"] == "seq-mean-token-mean"
    with pytest.raises(ValueError, match=r"^loss_type: unknown TRL loss type 'sapo'"):
        trl_loss_aggregation("sapo", mask)
    with pytest.raises(ValueError, match=r"^max_completion_length"):
        trl_loss_aggregation("dr_grpo", mask)
    with pytest.raises(ValueError, match=r"^num_items_in_batch"):
        trl_loss_aggregation("dapo", mask)
    with pytest.raises(ValueError, match=r"^gradient_accumulation_steps"):
        trl_loss_aggregation("bnpo", mask, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match=r"^mask"):
        trl_loss_aggregation("bnpo", mask[0])
