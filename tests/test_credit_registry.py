"""The credit registry: declarations, specs and their errors, composition by product, a fourth
method registered from outside the package, and credit= on both surrogate losses equal to the
explicit calls (fipo_weights / entropy_mask, then coef= and the mask)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import delta_kernels as dk
from delta_kernels import credit
from delta_kernels.credit import registry


def batch(rows=4, cols=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g, dtype=dtype) * 2 - 0.1
    logp = (old + 0.6 * torch.randn(rows, cols, generator=g, dtype=dtype)).clamp_max(-1e-3)
    old[0, :2] = logp[0, :2] - 3.0  # two dual-clipped tokens with a negative advantage: row 0 dropped by FIPO
    adv = torch.randn(rows, generator=g, dtype=dtype)
    adv[0] = -1.0
    mask = torch.rand(rows, cols, generator=g) > 0.2
    mask[0, :2] = True
    ent = torch.rand(rows, cols, generator=g, dtype=dtype)
    return logp, old, adv, mask, ent


def test_declarations():
    assert {"delta", "fipo", "entropy"} <= set(credit.methods())
    assert credit.method("delta").kind == credit.BEFORE_UPDATE and not credit.method("delta").depends_on_theta
    for name in ("fipo", "entropy"):
        m = credit.method(name)
        assert m.kind == credit.IN_LOSS and m.depends_on_theta
    assert "rows_dropped" in credit.method("fipo").metrics and "kept_frac" in credit.method("entropy").metrics


@pytest.mark.parametrize("spec,match", [
    ("fipo*", "malformed spec"), ("foo", "unknown credit method 'foo'"), ("fipo*fipo", "names a method twice"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=f"^credit: .*{match}"):
        dk.credit_spec(spec)


def test_options_are_checked_and_never_silently_dropped():
    spec = dk.credit_spec("fipo*entropy", fipo=dict(decay_rate=8.0), entropy=dict(top_quantile=0.5))
    assert spec.option("fipo").decay_rate == 8.0 and spec.option("entropy").top_quantile == 0.5
    assert spec.name == "fipo*entropy" and dk.credit_spec("none").methods == ()
    with pytest.raises(ValueError, match="^credit: options given for \\['entropy'\\]"):
        dk.credit_spec("fipo", entropy=dict(top_quantile=0.5))
    with pytest.raises(ValueError, match="^fipo options: unknown \\['decay'\\]"):
        dk.credit_spec("fipo", fipo=dict(decay=3))
    with pytest.raises(ValueError, match="^decay_rate: must be > 0"):
        dk.credit_spec("fipo", fipo=dict(decay_rate=0))
    with pytest.raises(ValueError, match="^top_quantile: must be in"):
        dk.credit_spec("entropy", entropy=dict(top_quantile=2))


def test_before_update_methods_go_through_coef():
    logp, old, adv, mask, _ = batch()
    with pytest.raises(ValueError, match="^credit: 'delta' is computed before the update: pass its weights as coef="):
        dk.clipped_surrogate_loss(logp, old, adv, mask, credit="delta*fipo")


def test_missing_inputs_are_named():
    logp, old, adv, mask, _ = batch()
    with pytest.raises(ValueError, match="^entropy: credit method 'entropy' needs entropy$"):
        dk.clipped_surrogate_loss(logp, old, adv, mask, credit="entropy")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_composition_is_the_explicit_product(agg):
    logp, old, adv, mask, ent = batch()
    coef = 0.5 + torch.rand(logp.shape, dtype=torch.float64)
    fw = dk.fipo_weights(logp, old, adv, mask, decay_rate=8.0)
    hi = dk.entropy_mask(ent, mask, top_quantile=0.5)
    assert not bool(fw.keep[0]) and bool(fw.keep[1:].all())
    lp1, lp2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ref, _ = dk.clipped_surrogate_loss(lp1, old, adv, mask & fw.keep[:, None], coef=coef * fw.weights * hi, agg=agg)
    spec = dk.credit_spec("fipo*entropy", fipo=dict(decay_rate=8.0), entropy=dict(top_quantile=0.5))
    loss, metrics = dk.clipped_surrogate_loss(lp2, old, adv, mask, coef=coef, credit=spec, entropy=ent, agg=agg)
    (ref + loss).backward()
    assert torch.equal(loss.detach(), ref.detach()) and torch.equal(lp1.grad, lp2.grad)
    assert float(metrics["fipo/rows_dropped"]) == 1.0
    w = fw.weights[mask]
    at_bound = ((w >= 1.2 - 1e-7) | (w <= 1.0 + 1e-7)).double().mean()
    assert [float(metrics[f"fipo/{k}"]) for k in ("weight_mean", "weight_min", "weight_max", "clip_frac")] == \
        [float(w.mean()), float(w.min()), float(w.max()), float(at_bound)]
    assert float(metrics["entropy/kept_frac"]) == float(hi.sum() / mask.sum())


def test_delta_through_the_registry_is_delta_coefficients():
    logp, _, adv, mask, _ = batch(dtype=torch.float32)
    h = torch.randn(*logp.shape, 8)
    spec = dk.credit_spec("delta", delta=dict(k=2))
    cw = credit.credit_weights(spec, credit.CreditInputs(mask=mask, advantages=adv, logp=logp, hidden=h))
    assert torch.equal(cw.weights, dk.delta_coefficients(h, logp, adv, mask, k=2).coef)
    assert set(cw.metrics) == {f"delta/{m}" for m in credit.method("delta").metrics}


def test_fused_lm_head_loss_with_credit_equals_the_explicit_calls():
    g = torch.Generator().manual_seed(5)
    rows, cols, hid, vocab = 3, 7, 8, 11
    h = torch.randn(rows, cols, hid, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, vocab, (rows, cols), generator=g)
    mask = torch.rand(rows, cols, generator=g) > 0.2
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp, ent, _, _ = dk.fused_linear_logprob_sketch(h, w, y, entropy=True, backend="torch")
    old = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    old = old.clamp_max(-1e-4)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    fw = dk.fipo_weights(lp, old, adv, mask)
    hi = dk.entropy_mask(ent, mask, top_quantile=0.4)
    ref, _ = dk.fused_linear_clipped_surrogate_loss(h1, w, y, old, adv, mask & fw.keep[:, None],
                                                   coef=fw.weights * hi, backend="torch")
    spec = dk.credit_spec("fipo*entropy", entropy=dict(top_quantile=0.4))
    loss, metrics = dk.fused_linear_clipped_surrogate_loss(h2, w, y, old, adv, mask, credit=spec, backend="torch")
    (ref + loss).backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0) and torch.allclose(h1.grad, h2.grad, rtol=1e-10, atol=1e-14)
    assert "fipo/weight_mean" in metrics and "entropy/threshold" in metrics


def test_a_fourth_method_is_one_registration():
    """A method registered here (no other file touched) works in specs and both losses."""
    @dataclass(frozen=True)
    class HalfOptions:
        factor: float = 0.5

    def compute(inputs, options):
        return credit.CreditWeights(weights=torch.full(inputs.mask.shape, options.factor, dtype=torch.float64),
                                    metrics=dict(factor=torch.tensor(options.factor)))

    credit.register(credit.CreditMethod(name="half_test", kind=credit.IN_LOSS, inputs=("mask",),
                                        depends_on_theta=True, metrics=("factor",), options=HalfOptions,
                                        compute=compute))
    try:
        logp, old, adv, mask, _ = batch()
        ref, _ = dk.clipped_surrogate_loss(logp, old, adv * 0.25, mask)
        loss, metrics = dk.clipped_surrogate_loss(logp, old, adv, mask,
                                                  credit=dk.credit_spec("half_test", half_test=dict(factor=0.25)))
        assert torch.allclose(loss, ref, rtol=1e-14) and float(metrics["half_test/factor"]) == 0.25
    finally:
        registry._REGISTRY.pop("half_test")


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="unknown inputs"):
        credit.CreditMethod("x", credit.IN_LOSS, ("logits",), True, (), object, lambda i, o: None)
    with pytest.raises(ValueError, match="depend on theta are computed in the loss"):
        credit.CreditMethod("x", credit.BEFORE_UPDATE, ("mask",), True, (), object, lambda i, o: None)
