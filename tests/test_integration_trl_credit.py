"""DeltaGRPOTrainer(credit=...): the entropy method equals TRL's own top_entropy_quantile run
(same parameters after training: same losses and gradients), delta*entropy trains; FIPO's loss and
gradient equal fipo_weights + the dual-clip surrogate with TRL's aggregation written out, its drop
rule included, and delta*fipo*entropy trains."""
import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

import functools  # noqa: E402

import delta_kernels as dk  # noqa: E402
from delta_kernels.integrations import trl as adapter  # noqa: E402
from integration_models import prompts  # noqa: E402
from test_integration_trl import OLD_PASS  # noqa: E402
from test_integration_trl import make as make_trainer  # noqa: E402


def make(credit=None, delta=None, **cfg):
    return make_trainer(functools.partial(adapter.DeltaGRPOTrainer, credit=credit), delta=delta, **cfg)


def test_entropy_credit_equals_trl_top_entropy_quantile(monkeypatch):
    calls = []
    original = adapter.entropy_mask
    monkeypatch.setattr(adapter, "entropy_mask", lambda *a, **k: calls.append(1) or original(*a, **k))
    a = make_trainer(trl.GRPOTrainer, top_entropy_quantile=0.5)
    a.train()
    b = make(delta=None, credit=dk.credit_spec("entropy", entropy=dict(top_quantile=0.5)))
    b.train()
    assert calls, "the library's entropy_mask was not used"
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def test_delta_times_entropy_trains():
    tr = make(delta=dict(k=1), credit="delta*entropy")
    p0 = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert tr.top_entropy_quantile == 0.2 and tr.delta_last is not None
    assert sum(float((x - y.detach()).abs().sum()) for x, y in zip(p0, tr.model.parameters())) > 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(credit="fipo", importance_sampling_level="sequence"), ValueError, "^importance_sampling_level: not "),
    (dict(credit="fipo*entropy", entropy_coef=0.01), ValueError, "^entropy_coef: not supported with credit"),
    (dict(credit="fipo", loss_type="sapo"), ValueError, "^loss_type: not supported with credit 'fipo'"),
    (dict(credit="entropy", delta=dict(k=1)), ValueError, "^delta: DelTA options given"),
    (dict(credit="entropy", top_entropy_quantile=0.5), ValueError, "^top_entropy_quantile: set in GRPOConfig"),
])
def test_refused(kwargs, error, match):
    delta = kwargs.pop("delta", None)
    with pytest.raises(error, match=match):
        make(delta=delta, **kwargs)


def independent_fipo_loss(tr, logp, old, adv, trl_mask, num_items):
    """float64: delta_kernels.fipo_weights (torch), the dual-clip surrogate written out on A f
    (c = 10), rows FIPO drops masked out, then TRL 1.16's own normalisation for its loss_type
    (trl/trainer/grpo_trainer.py, _compute_loss) from TRL's mask."""
    mask = trl_mask.bool()
    fw = dk.fipo_weights(logp.detach(), old, adv, mask, backend="torch")
    a = adv[:, None] * fw.weights
    ratio = torch.exp((logp - old).clamp(-20, 20))
    clip1 = torch.maximum(-a * ratio, -a * ratio.clamp(1 - tr.epsilon_low, 1 + tr.epsilon_high))
    per_token = torch.where(a < 0, torch.minimum(clip1, -a * 10.0), clip1) * (mask & fw.keep[:, None])
    m, gas = trl_mask.double(), tr.current_gradient_accumulation_steps
    if tr.loss_type == "grpo":
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / gas
    elif tr.loss_type == "bnpo":
        loss = per_token.sum() / m.sum().clamp(min=1.0) / gas
    elif tr.loss_type == "dr_grpo":
        loss = per_token.sum() / (per_token.size(0) * tr.max_completion_length) / gas
    else:  # dapo
        loss = per_token.sum() / (num_items.clamp(min=1.0) / 1 * gas / tr.args.steps_per_generation)
    return loss, fw


def trl_logps(tr, out):
    """TRL's own forward of the policy on a generation batch: completion log-probs [B, T] (with grad)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    return tr._get_per_token_logps_and_entropies(tr.model, ids, attn, out["completion_ids"].shape[1])[0]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_fipo_loss_and_gradient_equal_the_independent_computation(loss_type):
    """One loss call of DeltaGRPOTrainer(credit="fipo") on a generation batch with off-policy old
    log-probs: two negative-advantage rows with ratios past c (one token: kept, its weight under
    the safety clamp; two tokens: dropped). Loss and every parameter's gradient equal the
    independent computation on the same batch and parameters (the log-probs of both from TRL's
    own forward, its fused LM head: what is compared is the loss on them)."""
    tr = make(credit="fipo", loss_type=loss_type, max_completion_length=8)
    tr.model.train()
    out = tr._generate_and_score_completions([{"prompt": p} for p in prompts(4)])
    mask = out["completion_mask"].bool()
    rows = mask.sum(1).argsort(descending=True)
    assert int(mask[rows[1]].sum()) >= 2
    logp = trl_logps(tr, out).detach()
    g = torch.Generator().manual_seed(5)
    old = logp + 0.2 * torch.randn(logp.shape, generator=g)
    adv = torch.randn(mask.shape[0], generator=g)
    adv[rows[:2]] = -0.5 - torch.rand(2, generator=g)
    old[rows[0], 0], old[rows[0], 1] = logp[rows[0], 0] - 3.0, logp[rows[0], 1] - 2.7  # two past c: dropped
    old[rows[1], 0] = logp[rows[1], 0] - 3.0                                          # one past c: kept
    out["advantages"], out["old_per_token_logps"] = adv, old
    tr.current_gradient_accumulation_steps = 2
    params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.model.zero_grad()
    loss = tr.compute_loss(tr.model, out)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    tr.model.zero_grad()
    lp = trl_logps(tr, out)
    ref, fw = independent_fipo_loss(tr, lp.double(), old.double(), adv.double(), out["completion_mask"],
                                    out["num_items_in_batch"])
    ref.backward()
    assert not bool(fw.keep[rows[0]]) and bool(fw.keep[rows[1]]) and int(fw.keep.sum()) == mask.shape[0] - 1
    assert float(fw.weights[rows[1], 0]) <= 1.0 and float(fw.weights[mask].std()) > 0.01
    assert tr._metrics["train"]["fipo/rows_dropped"][-1] == 1.0
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-7)
    scale = max(float(p.grad.abs().max()) for p in params)
    assert scale > 0
    for p, mine in zip(params, grads):
        torch.testing.assert_close(mine.double(), p.grad.double(), rtol=1e-4, atol=1e-5 * scale)


def test_delta_times_fipo_times_entropy_trains():
    tr = make(delta=dict(k=1), credit="delta*fipo*entropy", **OLD_PASS)
    p0 = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert tr.delta_last is not None
    assert sum(float((x - y.detach()).abs().sum()) for x, y in zip(p0, tr.model.parameters())) > 0
    logged = [entry for entry in tr.state.log_history if "fipo/weight_mean" in entry]
    assert len(logged) == 3
    assert {"fipo/rows_dropped", "entropy/threshold", "entropy/kept_frac", "clip_frac", "entropy"} <= set(logged[-1])
    assert 0 < logged[-1]["entropy/kept_frac"] < 1
