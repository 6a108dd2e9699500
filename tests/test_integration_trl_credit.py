"""DeltaGRPOTrainer(credit=...): the entropy method equals TRL's own top_entropy_quantile run
(same parameters after training: same losses and gradients), delta*entropy trains, FIPO is refused."""
import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

import functools  # noqa: E402

import delta_kernels as dk  # noqa: E402
from delta_kernels.integrations import trl as adapter  # noqa: E402
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
    (dict(credit="fipo"), NotImplementedError, "FIPO changes the loss"),
    (dict(credit="entropy", delta=dict(k=1)), ValueError, "^delta: DelTA options given"),
    (dict(credit="entropy", top_entropy_quantile=0.5), ValueError, "^top_entropy_quantile: set in GRPOConfig"),
])
def test_refused(kwargs, error, match):
    delta = kwargs.pop("delta", None)
    with pytest.raises(error, match=match):
        make(delta=delta, **kwargs)
