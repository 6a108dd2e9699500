"""Bad input gets a clear error naming the argument, before any backend runs."""
import pytest
import torch

import delta_kernels as dk
import delta_kernels.coefficients
import delta_kernels.sketch
import delta_kernels.surrogate
from helpers import make_batch


@pytest.fixture(autouse=True)
def no_backend(monkeypatch):
    """Validation must finish before dispatch: any call that reaches a backend fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a backend was reached with invalid input")
    for mod in (delta_kernels.coefficients, delta_kernels.sketch, delta_kernels.surrogate):
        monkeypatch.setattr(mod, "resolve", refuse)


def batch():
    return make_batch(3, 4, 5, seed=0)


def coef_call(**over):
    h, logp, adv, mask = batch()
    args = dict(hidden=h, logp=logp, advantages=adv, mask=mask)
    args.update(over)
    kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "logp", "advantages", "mask")}
    return dk.delta_coefficients(args["hidden"], args["logp"], args["advantages"], args["mask"], **kw)


def raises(name, fn, exc=(ValueError, TypeError)):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), f"error does not name {name!r}: {info.value}"
    return str(info.value)


def test_hidden_shape_mismatch():
    raises("hidden", lambda: coef_call(hidden=torch.randn(3, 5, 5)))
    raises("hidden", lambda: coef_call(hidden=torch.randn(12, 5)))


def test_integer_and_complex_hidden():
    raises("hidden", lambda: coef_call(hidden=torch.ones(3, 4, 5, dtype=torch.int32)))
    raises("hidden", lambda: coef_call(hidden=torch.ones(3, 4, 5, dtype=torch.complex64)))


def test_mask_wrong_shape_and_values():
    raises("mask", lambda: coef_call(mask=torch.ones(3, 5, dtype=torch.bool)))
    raises("mask", lambda: coef_call(mask=torch.full((3, 4), 2.0)))


def test_advantages_wrong_shape():
    raises("advantages", lambda: coef_call(advantages=torch.randn(4)))
    raises("advantages", lambda: coef_call(advantages=torch.randn(3, 5)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hidden_reports_first_index(bad):
    h = batch()[0].clone()
    h[1, 2, 3] = bad
    h[2, 0, 0] = bad
    msg = raises("hidden", lambda: coef_call(hidden=h))
    assert "[1, 2, 3]" in msg


def test_non_finite_logp_and_advantages():
    logp = batch()[1].clone()
    logp[0, 1] = float("nan")
    assert "[0, 1]" in raises("logp", lambda: coef_call(logp=logp))
    adv = batch()[2].clone()
    adv[2] = float("inf")
    raises("advantages", lambda: coef_call(advantages=adv))


def test_positive_logp():
    logp = batch()[1].clone()
    logp[2, 3] = 0.25
    raises("logp", lambda: coef_call(logp=logp))


@pytest.mark.parametrize("kw,name", [(dict(k=-1), "k"), (dict(k=1.5), "k"), (dict(lam_min=1.3), "lam_min"),
                                     (dict(lam_min=-0.1), "lam_min"), (dict(lam_min=0.0, lam_max=0.0), "lam_max"), (dict(eps=0.0), "eps"),
                                     (dict(sketch_dim=0), "sketch_dim"), (dict(seed=-1), "seed"),
                                     (dict(seed=2**32), "seed"), (dict(lam_max=float("nan")), "lam_max")])
def test_bad_parameters(kw, name):
    raises(name, lambda: coef_call(**kw))


def test_unknown_backend():
    # resolve is patched out here; the real one is exercised in test_backends.py
    h, logp, adv, mask = batch()
    from delta_kernels._backends import resolve
    with pytest.raises(ValueError, match="backend"):
        resolve("cudnn", h.device, h.dtype, "delta_coefficients")


def test_tensors_on_different_devices():
    raises("advantages", lambda: coef_call(advantages=torch.randn(3, device="meta")))


def test_hidden_and_vectors_exclusive():
    raises("hidden", lambda: coef_call(vectors=torch.randn(3, 4, 5)))
    raises("side_sums", lambda: coef_call(side_sums=torch.randn(2, 5)))


def test_token_sketch_bad_inputs():
    h, logp, _, _ = batch()
    raises("sketch_dim", lambda: dk.token_sketch(h, logp, sketch_dim=0))
    raises("hidden", lambda: dk.token_sketch(h[:, :2], logp))
    raises("logp", lambda: dk.token_sketch(h, -logp))
    raises("hidden", lambda: dk.token_sketch(h.to(torch.int64), logp))


def test_surrogate_bad_inputs():
    _, logp, adv, mask = batch()
    old = logp - 0.1
    raises("agg", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, agg="sum"))
    raises("agg", lambda: dk.clipped_surrogate_loss(logp.reshape(-1), old.reshape(-1), adv[:, None].expand(3, 4)
                                                    .reshape(-1), mask.reshape(-1), agg="seq-mean-token-sum"))
    raises("old_logp", lambda: dk.clipped_surrogate_loss(logp, old[:, :3], adv, mask))
    raises("coef", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, coef=torch.ones(3, 3)))
    bad = torch.ones(3, 4)
    bad[tuple(mask.nonzero()[0])] = float("nan")  # at a valid token (padding is not read)
    raises("coef", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, coef=bad))
    raises("rollout_is_weights", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, rollout_is_weights=bad))
    raises("rollout_is_weights", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask,
                                                                   rollout_is_weights=torch.ones(4, 3)))
    raises("dp_size", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, dp_size=0))
    raises("batch_num_tokens", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, dp_size=2))
    raises("global_batch_size", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, dp_size=2,
                                                                  agg="seq-mean-token-sum"))
    raises("loss_scale_factor", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, loss_scale_factor=-2))
    raises("clip_low", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, clip_low=1.5))
    raises("clip_c", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask, clip_c=0.5))
    raises("mask", lambda: dk.clipped_surrogate_loss(logp, old, adv, mask[:, :2]))
