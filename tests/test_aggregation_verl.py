"""clipped_surrogate_loss and fused_linear_clipped_surrogate_loss against verl 0.9.1's own
compute_policy_loss_vanilla / agg_loss (the oracle, run in float64 on the same inputs): every
mode of the library's list x {no normaliser, loss_scale_factor, dp_size=2 with global counts}
x {with, without rollout_is_weights}, with a fully masked row: loss, d loss / d input, metrics."""
from __future__ import annotations

import math

import pytest
import torch

import delta_kernels as dk
from delta_kernels._backends import LM_HEAD
from delta_kernels.aggregation import AGG_MODES
from backend_cases import backend_dtype_params
from helpers import assert_rel

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
ActorConfig = pytest.importorskip("verl.workers.config.actor").ActorConfig

CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0
NORMALISERS = {
    "none": {},
    "loss_scale_factor": dict(loss_scale_factor=13),
    "dp2_global": dict(dp_size=2, batch_num_tokens=61, global_batch_size=11),
}
TOL = {torch.float64: 1e-7, torch.float32: 3e-5}  # relative, per input dtype
METRICS = {"clip_frac": "actor/pg_clipfrac", "clip_frac_lower": "actor/pg_clipfrac_lower", "ppo_kl": "actor/ppo_kl"}


def verl_loss(logp, old_logp, adv, mask, mode, normalisers, rollout_is_weights):
    """verl 0.9.1's compute_policy_loss_vanilla in float64; returns (loss, metrics); logp may require grad."""
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_torch_compile=False,
                      clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C)
    cfg.global_batch_info.update(normalisers)
    return core_algos.compute_policy_loss_vanilla(old_logp, logp, adv, mask.double(), loss_agg_mode=mode, config=cfg,
                                                  rollout_is_weights=rollout_is_weights)


def surrogate_inputs(seed, shape=(6, 9)):
    """Ratios across both clip bounds and the dual clip, per-token advantages, coefficients,
    rollout weights, ~25% padding and a fully masked row (row 2)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g) * 2 - 0.05
    logp = (old + 0.35 * torch.randn(shape, generator=g)).clamp_max(-1e-3)
    old[0, :3] = logp[0, :3] - 2.0  # ratio e^2 > clip_c: the dual clip for negative advantages
    adv = torch.randn(shape, generator=g)
    adv[0, :3] = -torch.rand(3, generator=g) - 0.5
    coef = 0.5 + torch.rand(shape, generator=g)
    isw = 0.3 + 1.4 * torch.rand(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    mask[0, :3] = True
    mask[2] = False
    return logp, old, adv, coef, isw, mask


@pytest.mark.parametrize("weighted", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("norm", list(NORMALISERS))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_verl(backend, dtype, mode, norm, weighted):
    tol = TOL[dtype]
    logp, old, adv, coef, isw, mask = (t.to(dtype) if t.is_floating_point() else t
                                       for t in surrogate_inputs(seed=len(mode) + 7 * len(norm)))
    isw = isw if weighted else None
    dev = backend.device
    x = logp.clone().to(dev).requires_grad_()
    loss, metrics = dk.clipped_surrogate_loss(x, old.to(dev), adv.to(dev), mask.to(dev), coef=coef.to(dev),
                                              clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C, agg=mode,
                                              rollout_is_weights=None if isw is None else isw.to(dev),
                                              backend=backend, **NORMALISERS[norm])
    loss.backward()
    x64 = logp.double().requires_grad_()
    ref, ref_metrics = verl_loss(x64, old.double(), adv.double() * coef.double(), mask, mode, NORMALISERS[norm],
                                 None if isw is None else isw.double())
    ref.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ref_metrics["actor/pg_clipfrac"] > 0 and ref_metrics["actor/pg_clipfrac_lower"] > 0  # both clips reached
    assert_rel(loss, ref, tol, f"{mode} loss")
    assert_rel(x.grad, x64.grad, tol, f"{mode} d loss / d logp")
    assert bool((x.grad.cpu()[~mask] == 0).all())
    for ours, theirs in METRICS.items():
        assert metrics[ours].item() == pytest.approx(ref_metrics[theirs], rel=tol, abs=1e-7), ours


def _lm(shape, hdim, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) * (2.0 / math.sqrt(hdim))
    y = torch.randint(0, vocab, shape, generator=g)
    return h.to(dtype), w.to(dtype), y


@pytest.mark.parametrize("weighted", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("norm", list(NORMALISERS))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(LM_HEAD))
def test_fused_matches_verl(backend, dtype, mode, norm, weighted):
    tol = TOL[dtype]
    if backend != "torch" and norm == "loss_scale_factor":
        pytest.skip("the aggregation is the torch path's on every fused backend: two normalisers suffice here")
    shape, temperature = (4, 7), 0.9
    h, w, y = _lm(shape, 24, 97, dtype, seed=len(mode))
    _, old, adv, coef, isw, mask = surrogate_inputs(seed=len(mode) + 3, shape=shape)
    isw = isw if weighted else None
    dev = backend.device
    hh, ww = h.clone().to(dev).requires_grad_(), w.clone().to(dev).requires_grad_()
    loss, metrics = dk.fused_linear_clipped_surrogate_loss(
        hh, ww, y.to(dev), old.to(dev, dtype), adv.to(dev, dtype), mask.to(dev), coef=coef.to(dev, dtype),
        temperature=temperature, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_c=CLIP_C, agg=mode,
        rollout_is_weights=None if isw is None else isw.to(dev, dtype), backend=backend, **NORMALISERS[norm])
    loss.backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.T / temperature, -1).gather(-1, y[..., None])[..., 0]
    ref, ref_metrics = verl_loss(logp, old.double(), adv.double() * coef.double(), mask, mode, NORMALISERS[norm],
                                 None if isw is None else isw.double())
    ref.backward()
    assert_rel(loss, ref, tol, f"{mode} loss")
    assert_rel(hh.grad, h64.grad, tol, "d hidden")
    assert_rel(ww.grad, w64.grad, tol, "d weight")
    for ours, theirs in METRICS.items():
        assert metrics[ours].item() == pytest.approx(ref_metrics[theirs], rel=tol, abs=1e-7), ours
