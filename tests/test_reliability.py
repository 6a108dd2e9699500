"""Happy paths off the beaten track, for every public call and every backend that runs here:
non-contiguous and expanded tensors, empty batches, NaN/inf in each input, determinism."""
import os

import pytest
import torch

import delta_kernels as dk
from helpers import TOL, assert_rel, make_batch


def backends():
    out = [b for b in ("torch", "cpp") if b in dk.available_backends()]
    if "triton" in dk.available_backends() and os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    return out


BACKENDS = backends()


def ref_coef(h, logp, adv, mask, **kw):
    return dk.delta_coefficients(h.double(), logp.double(), adv.double(), mask, backend="torch", **kw).coef


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded_inputs(backend):
    h, logp, adv, mask = make_batch(5, 8, 12, seed=1)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)          # same values, non-contiguous
    logp_t = logp.t().contiguous().t()
    adv_tok = adv[:, None].expand(5, 8)                          # expanded, stride 0
    res = dk.delta_coefficients(h_t, logp_t, adv_tok, mask.t().contiguous().t(), k=1, backend=backend)
    assert_rel(res.coef, ref_coef(h, logp, adv, mask, k=1), TOL[torch.float32], "coef")
    shared = torch.randn(12).expand(5, 8, 12)                    # every token the same hidden state
    res = dk.delta_coefficients(shared, logp, adv, mask, backend=backend)
    assert_rel(res.coef, ref_coef(shared.contiguous(), logp, adv, mask), TOL[torch.float32], "expanded coef")
    z = dk.token_sketch(h_t, logp_t, sketch_dim=4, backend=backend)
    assert_rel(z, dk.token_sketch(h.double(), logp.double(), sketch_dim=4, backend="torch"), TOL[torch.float32], "z")
    lp = logp_t.detach().clone().requires_grad_(True)
    loss, _ = dk.clipped_surrogate_loss(lp, logp_t - 0.1, adv_tok, mask, coef=res.coef.t().contiguous().t(),
                                        backend=backend)
    loss.backward()
    ref, _ = dk.clipped_surrogate_loss(logp.double(), logp.double() - 0.1, adv.double(), mask,
                                       coef=res.coef.double(), backend="torch")
    assert_rel(loss.reshape(1), ref.reshape(1), TOL[torch.float32], "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    h, logp, adv, mask = torch.randn(0, 6), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    res = dk.delta_coefficients(h, logp, adv, mask, k=2, backend=backend)
    assert res.coef.shape == (0,) and torch.isfinite(res.stats.gamma_pos)
    assert dk.token_sketch(h, logp, sketch_dim=3, backend=backend).shape == (0, 3)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = dk.clipped_surrogate_loss(lp, logp, adv, mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_sequence_batch_matches_the_reference(backend, agg):
    """[0, T]: every backend returns what the reference returns (a NaN mean over no sequences
    included) and a [0, T] gradient, never an exception."""
    logp, mask = torch.zeros(0, 4), torch.ones(0, 4, dtype=torch.bool)
    ref, ref_m = dk.clipped_surrogate_loss(logp, logp, torch.zeros(0), mask, agg=agg, backend="torch")
    lp = logp.clone().requires_grad_(True)
    loss, metrics = dk.clipped_surrogate_loss(lp, logp, torch.zeros(0), mask, agg=agg, backend=backend)
    loss.backward()
    assert torch.equal(loss.detach(), ref.detach()) or (loss.isnan() and ref.isnan()), (loss, ref)
    assert lp.grad.shape == (0, 4) and all(torch.equal(metrics[k], ref_m[k]) for k in ref_m)


INPUTS = ["hidden", "logp", "advantages", "old_logp", "coef"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(backend, name, bad):
    h, logp, adv, mask = make_batch(3, 4, 5, seed=2)
    args = dict(hidden=h, logp=logp, advantages=adv, old_logp=logp - 0.1, coef=torch.rand(3, 4) + 0.5)
    t = args[name].clone()
    # at a valid position: the value checks look only there (padding is don't-care)
    valid = mask.any(1) if t.dim() == 1 else mask
    t[tuple(valid.nonzero()[-1])] = bad
    args[name] = t
    if t.shape == mask.shape:
        mask.view(-1)[t.numel() // 2] = True  # a valid token: padding is not read, nor checked
    with pytest.raises(ValueError, match=name):
        if name in ("hidden", "logp", "advantages"):
            dk.delta_coefficients(args["hidden"], args["logp"], args["advantages"], mask, backend=backend)
            dk.token_sketch(args["hidden"], args["logp"], backend=backend)
        if name != "hidden":
            dk.clipped_surrogate_loss(args["logp"], args["old_logp"], args["advantages"], mask, coef=args["coef"],
                                      backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_bitwise_equal(backend):
    h, logp, adv, mask = make_batch(6, 7, 20, seed=3, dtype=torch.bfloat16)
    a = dk.delta_coefficients(h, logp, adv, mask, k=2, sketch_dim=8, backend=backend)
    b = dk.delta_coefficients(h, logp, adv, mask, k=2, sketch_dim=8, backend=backend)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.stats.mu_pos, b.stats.mu_pos)
    la, ma = dk.clipped_surrogate_loss(logp.float(), logp.float() - 0.2, adv, mask, coef=a.coef, backend=backend)
    lb, mb = dk.clipped_surrogate_loss(logp.float(), logp.float() - 0.2, adv, mask, coef=a.coef, backend=backend)
    assert torch.equal(la, lb) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_absurd_but_valid_parameters(backend):
    h, logp, adv, mask = make_batch(4, 5, 6, seed=4)
    for kw in (dict(k=20), dict(lam_min=0.0, lam_max=100.0), dict(eps=1e3), dict(sketch_dim=1), dict(seed=2**32 - 1)):
        res = dk.delta_coefficients(h, logp, adv, mask, backend=backend, **kw)
        assert torch.isfinite(res.coef).all(), kw
        assert_rel(res.coef, ref_coef(h, logp, adv, mask, **kw), TOL[torch.float32] * 10, str(kw))
    h_big = h * 1e15  # squared distances near the float32 range
    assert torch.isfinite(dk.delta_coefficients(h_big, logp, adv, mask, backend=backend).coef).all()
