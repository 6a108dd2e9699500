"""One rule for padding (docs/reliability.md): for every public call of ``delta_kernels.__all__`` that
takes per-token inputs, NaN, +inf or -inf in every per-token float input at the padded positions (and
out-of-range token ids there) are accepted with the value checks on, and change no bit of the outputs at
valid positions, of the whole-batch outputs (losses, metrics, statistics) or of any gradient.

The calls are collected from ``__all__`` (a parameter named like a per-token input); a call missing
from CASES fails ``test_every_public_per_token_call_has_a_case``.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import delta_kernels as dk
from delta_kernels._backends import lm_head_backends

PER_TOKEN = {"hidden", "logp", "old_logp", "advantages", "mask", "targets", "coef", "entropy", "rollout_is_weights",
             "vectors"}
B, T, H, V, R = 3, 5, 8, 40, 4
VALUES = (float("nan"), float("inf"), float("-inf"))
MIXED = None  # NaN, +inf and -inf in turn along each input's padded elements
NO_MASK = "takes no mask: every token is valid, there is no padding"


def public_per_token_calls():
    """Names in __all__ whose signature (a class: its public methods) has a per-token parameter."""
    found = set()
    for name in dk.__all__:
        obj = getattr(dk, name)
        fns = [f for m, f in inspect.getmembers(obj, inspect.isfunction) if not m.startswith("_")] \
            if inspect.isclass(obj) else [obj] if callable(obj) else []
        if any(PER_TOKEN & set(inspect.signature(f).parameters) for f in fns):
            found.add(name)
    return found


def make_inputs(seed=0, device="cpu"):
    """Fresh random inputs, [B, T] tokens, a fully masked sequence and a fully valid one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0], mask[1] = True, False
    mask[2, 0] = True
    adv = torch.randn(B, T, generator=g)
    adv[2, 0] = -abs(float(adv[2, 0])) - 0.1  # both signs valid
    adv[0, 0] = abs(float(adv[0, 0])) + 0.1
    x = dict(hidden=torch.randn(B, T, H, generator=g) + torch.randn(H, generator=g),
             logp=-torch.rand(B, T, generator=g) * 3 - 1e-3, old_logp=-torch.rand(B, T, generator=g) * 3 - 1e-3,
             advantages=adv, coef=torch.rand(B, T, generator=g) + 0.5,
             rollout_is_weights=torch.rand(B, T, generator=g) + 0.5, entropy=torch.rand(B, T, generator=g) * 2,
             targets=torch.randint(0, V, (B, T), generator=g), mask=mask,
             weight=torch.randn(V, H, generator=g) * 0.3, bias=torch.randn(V, generator=g) * 0.1)
    return {k: v.to(device) for k, v in x.items()}


def poison(x, value):
    """x with value (or MIXED) in every per-token float input at padding, and out-of-range targets
    there (-100, HF's ignore index, and V)."""
    pad = ~x["mask"]
    out = dict(x)
    for k in PER_TOKEN - {"mask", "vectors"}:
        t = x[k].clone()
        shape = t[pad].shape
        cycle = torch.tensor([-100, V] if k == "targets" else VALUES, dtype=t.dtype, device=t.device)
        if value is MIXED:
            t[pad] = cycle.repeat(shape.numel())[:shape.numel()].reshape(shape)
        else:
            t[pad] = (-100 if value != value else V) if k == "targets" else value
        out[k] = t
    return out


def leaves(x, *names):
    """Copies of x[name] that require grad (the call's differentiable inputs)."""
    return [x[n].detach().clone().requires_grad_() for n in names]


def results(prefix, obj, mask, out):
    """Every tensor in obj (tuples, lists, dicts, dataclasses) into out: label -> (tensor, valid),
    valid = mask for a per-token tensor (leading dims like the mask), else None (compared whole)."""
    if isinstance(obj, torch.Tensor):
        per_token = obj.dim() >= mask.dim() and tuple(obj.shape[:mask.dim()]) == tuple(mask.shape)
        out[prefix] = (obj.detach(), mask if per_token else None)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            results(f"{prefix}.{f.name}", getattr(obj, f.name), mask, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            results(f"{prefix}.{k}", v, mask, out)
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            results(f"{prefix}[{i}]", v, mask, out)
    return out


def grads(prefix, tensors, out):
    for i, t in enumerate(tensors):
        out[f"{prefix}.grad[{i}]"] = (t.grad, None)  # compared whole: 0 at padding on both sides
    return out


def delta_coefficients(x, be):
    out = {}
    for sd in (None, R):
        r = dk.delta_coefficients(x["hidden"], x["logp"], x["advantages"], x["mask"], k=2, sketch_dim=sd, backend=be)
        results(f"sketch_dim={sd}", r, x["mask"], out)
    return out


def clipped_surrogate_loss(x, be):
    out = {}
    for agg, credit in (("token-mean", None), ("seq-mean-token-mean", "fipo*entropy")):
        (logp,) = leaves(x, "logp")
        loss, metrics = dk.clipped_surrogate_loss(logp, x["old_logp"], x["advantages"], x["mask"], coef=x["coef"],
                                                  rollout_is_weights=x["rollout_is_weights"], agg=agg, credit=credit,
                                                  entropy=x["entropy"] if credit else None, backend=be)
        loss.backward()
        grads(agg, [logp], results(agg, (loss, metrics), x["mask"], out))
    return out


def fipo_weights(x, be):
    return results("fipo", dk.fipo_weights(x["logp"], x["old_logp"], x["advantages"], x["mask"], backend=be),
                   x["mask"], {})


def entropy_mask(x, be):
    return results("entropy_mask", dk.entropy_mask(x["entropy"], x["mask"], top_quantile=0.4), x["mask"], {})


def accumulator(x, be):
    out = {}
    for early in (True, False):
        acc = dk.DeltaAccumulator(k=2, backend=be)
        for rows in (slice(0, 2), slice(2, 3)):
            acc.add(x["hidden"][rows], x["logp"][rows], x["mask"][rows],
                    advantages=x["advantages"][rows] if early else None)
        got = acc.finalize() if early else acc.finalize([x["advantages"][:2], x["advantages"][2:]])
        for i, (r, rows) in enumerate(zip(got, (slice(0, 2), slice(2, 3)))):
            results(f"early={early}[{i}]", r, x["mask"][rows], out)
    return out


def fused_logprob_sketch(x, be):
    out = {}
    for sd in (None, R):
        got = dk.fused_linear_logprob_sketch(x["hidden"], x["weight"], x["targets"], bias=x["bias"], sketch_dim=sd,
                                             entropy=True, advantages=x["advantages"], mask=x["mask"], backend=be)
        results(f"sketch_dim={sd}", got, x["mask"], out)
    return out


def fused_surrogate_loss(x, be):
    h, w, b = leaves(x, "hidden", "weight", "bias")
    loss, metrics = dk.fused_linear_clipped_surrogate_loss(
        h, w, x["targets"], x["old_logp"], x["advantages"], x["mask"], coef=x["coef"], bias=b,
        rollout_is_weights=x["rollout_is_weights"], return_logp=True, entropy=True, credit="fipo*entropy",
        backend=be)
    loss.backward()
    return grads("fused", [h, w, b], results("fused", (loss, metrics), x["mask"], {}))


# name -> how to call it (x, backend) -> {label: (tensor, valid or None)}, or why it has no padding
CASES = {
    "delta_coefficients": delta_coefficients,
    "clipped_surrogate_loss": clipped_surrogate_loss,
    "fipo_weights": fipo_weights,
    "entropy_mask": entropy_mask,
    "DeltaAccumulator": accumulator,
    "fused_linear_logprob_sketch": fused_logprob_sketch,
    "fused_linear_clipped_surrogate_loss": fused_surrogate_loss,
    "token_sketch": NO_MASK,
    "head_gradient_sketch": NO_MASK,
}
CALLS = [n for n, c in CASES.items() if callable(c)]


def test_every_public_per_token_call_has_a_case():
    assert public_per_token_calls() == set(CASES), "a public per-token call without a padding case (or a stale one)"
    for name, case in CASES.items():
        if case == NO_MASK:
            assert "mask" not in inspect.signature(getattr(dk, name)).parameters, name


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t (so -0 differs from +0 and NaN equals the same NaN)."""
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def backend_of(name, backend):
    """The backend= a call takes under this backend, or skip: the fused calls need the LM-head op,
    a call without backend= runs once (under torch)."""
    if name.startswith("fused_linear_") and backend not in lm_head_backends():
        pytest.skip(f"{backend} has no fused LM-head kernels")
    fn = getattr(dk, name)
    takes = "backend" in inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters
    if not takes and backend != "torch":
        pytest.skip(f"{name} takes no backend")
    return backend


@pytest.mark.parametrize("name", CALLS)
def test_padding_changes_no_bit(backend, name):
    be = backend_of(name, backend)
    x = make_inputs(0, backend.device)
    clean = CASES[name](x, be)
    assert clean
    for value in (MIXED,) if backend.interpreted else VALUES + (MIXED,):  # the interpreter is slow
        dirty = CASES[name](poison(x, value), be)
        assert dirty.keys() == clean.keys()
        for label, (c, valid) in clean.items():
            d = dirty[label][0]
            assert c.shape == d.shape and c.dtype == d.dtype, label
            if valid is not None:
                c, d = c[valid], d[valid]
            assert torch.equal(bits(c), bits(d)), f"{name} {label}: padding {value} changed valid results"


def test_fused_outputs_at_padding_are_zero(backend):
    """logp, entropy, the vectors (exact and sketched) and the hidden gradient are 0 at padding."""
    be = backend_of("fused_linear_logprob_sketch", backend)
    x = poison(make_inputs(1, backend.device), MIXED)
    pad = ~x["mask"]
    for sd in (None, R):
        logp, ent, vec, _ = dk.fused_linear_logprob_sketch(x["hidden"], x["weight"], x["targets"], bias=x["bias"],
                                                           sketch_dim=sd, entropy=True, advantages=x["advantages"],
                                                           mask=x["mask"], backend=be)
        for t in (logp, ent, vec):
            assert torch.equal(bits(t[pad]), torch.zeros_like(bits(t[pad])))
    h, w = leaves(x, "hidden", "weight")
    loss, _ = dk.fused_linear_clipped_surrogate_loss(h, w, x["targets"], x["old_logp"], x["advantages"], x["mask"],
                                                     backend=be)
    loss.backward()
    assert torch.equal(bits(h.grad[pad]), torch.zeros_like(bits(h.grad[pad]))) and torch.isfinite(w.grad).all()


def test_fused_value_checks_still_see_valid_positions():
    x = make_inputs(2)
    valid = x["mask"].nonzero()[1].tolist()  # a valid position, not the first
    for key, value, match in (("hidden", float("nan"), "hidden: non-finite"), ("targets", V, "targets: value"),
                              ("advantages", float("inf"), "advantages: non-finite")):
        bad = dict(x)
        bad[key] = x[key].clone()
        bad[key][tuple(valid)] = value
        with pytest.raises(ValueError, match=match):
            dk.fused_linear_logprob_sketch(bad["hidden"], x["weight"], bad["targets"], advantages=bad["advantages"],
                                           mask=x["mask"], backend="torch")
        with pytest.raises(ValueError, match=match):
            dk.fused_linear_clipped_surrogate_loss(bad["hidden"], x["weight"], bad["targets"], x["old_logp"],
                                                   bad["advantages"], x["mask"], backend="torch")
