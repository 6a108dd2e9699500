"""vectors="head" in the TRL and verl adapters: the coefficients equal DelTA on the head gradient's
factors computed from a plain forward of the same model (float64 reference on explicit z = u (x) s)."""
import pytest
import torch

import delta_kernels as dk
from delta_kernels.integrations import response_hidden_states
from delta_kernels.integrations.options import DeltaSpec


def reference(h, weight, bias, targets, logp, adv, mask, temperature, r1, r2, k):
    """float64 DelTA on the explicit z = u (x) s of head_gradient_sketch (u, s themselves in float64)."""
    u, s = dk.head_gradient_sketch(h.double(), weight.double(), targets, vocab_sketch_dim=r1, sketch_dim=r2,
                                   temperature=temperature, bias=None if bias is None else bias.double(),
                                   backend="torch")
    z = (u[..., :, None] * s[..., None, :]).flatten(-2)
    return dk.delta_coefficients(None, logp.double(), adv.double(), mask, vectors=z, k=k, backend="torch")


def test_spec_options():
    spec = DeltaSpec(k=1, vectors="head", vocab_sketch_dim=8, sketch_dim=16)
    assert spec.coefficient_kwargs()["sketch_dim"] is None and "vectors" not in spec.coefficient_kwargs()
    with pytest.raises(ValueError, match="^vectors: expected one of hidden, head"):
        DeltaSpec(vectors="token")
    with pytest.raises(ValueError, match="^vocab_sketch_dim: goes with vectors='head'"):
        DeltaSpec(vocab_sketch_dim=8)
    with pytest.raises(ValueError, match="^vocab_sketch_dim: must be >= 1"):
        DeltaSpec(vectors="head", vocab_sketch_dim=0)


def test_trl_head_vectors(monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from delta_kernels.integrations.trl import DeltaGRPOTrainer
    from test_integration_trl import OLD_PASS, keep_plain_advantages, make, unfused_old_pass
    seen = []
    orig = DeltaGRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = orig(self, inputs)
        h, logp = unfused_old_pass(self, out)
        weight = self.model.get_output_embeddings().weight.detach().clone()
        seen.append((h, weight, logp, out["plain_adv"], out, self.delta_last))
        return out

    keep_plain_advantages(monkeypatch)
    monkeypatch.setattr(DeltaGRPOTrainer, "_generate_and_score_completions", spy)
    tr = make(delta=dict(k=1, vectors="head", vocab_sketch_dim=8, sketch_dim=16), max_steps=2, **OLD_PASS)
    tr.train()
    h, weight, logp, adv, out, res = seen[-1]
    mask = out["completion_mask"].bool()
    ref = reference(h, weight, None, out["completion_ids"], logp, adv, mask, tr.temperature, 8, 16, 1)
    assert res.stats.W.numel() == 8 * 16
    torch.testing.assert_close(res.coef.double(), ref.coef, rtol=2e-4, atol=2e-4)
    assert res.coef[mask].std() > 0.01


def test_verl_head_vectors():
    pytest.importorskip("verl")
    pytest.importorskip("tensordict")
    from verl import DataProto
    from delta_kernels.integrations import verl as dv
    import test_integration_verl as tv
    model = tv.context_free_model().eval()
    td = tv.padded_batch()
    spec = dv.DeltaSpec(k=2, vectors="head", vocab_sketch_dim=6, sketch_dim=None, backend="torch")
    out = tv.worker_pass(model, td, spec, packed=True)
    mask = td["response_mask"].bool()
    scores = torch.randn(tv.B, generator=torch.Generator().manual_seed(3))
    data = DataProto.from_dict(tensors=dict(responses=td["responses"], response_mask=td["response_mask"],
                                            old_log_probs=out["log_probs"], advantages=scores[:, None] * mask))
    algo = tv.algorithm(k=2, vectors="head", vocab_sketch_dim=6, backend="torch")
    res = dv.fold_delta_into_advantages(data, algo, out[dv.VECTORS_KEY])
    with torch.no_grad():
        body = model.model(input_ids=td["input_ids"], attention_mask=td["attention_mask"],
                           position_ids=td["position_ids"]).last_hidden_state
    h = response_hidden_states(body, tv.R, attention_mask=td["attention_mask"])
    head = model.get_output_embeddings()
    ref = reference(h, head.weight.detach(), None, td["responses"], out["log_probs"] * mask, scores, mask, 1.0, 6,
                    None, 2)
    torch.testing.assert_close(res.coef.double(), ref.coef, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="^vocab_sketch_dim: algorithm.delta.vectors=head needs it"):
        dv.fold_delta_into_advantages(data, tv.algorithm(k=2, vectors="head"), out[dv.VECTORS_KEY])


@pytest.fixture(autouse=True)
def verl_cpu(request, monkeypatch, tmp_path_factory):
    """test_verl_head_vectors: verl's engine on the CPU with a one-rank gloo group (as test_integration_verl)."""
    if request.node.name != "test_verl_head_vectors":
        yield
        return
    pytest.importorskip("verl")
    import torch.distributed as dist
    from verl.workers.engine.fsdp import transformer_impl as ti
    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0,
                                world_size=1)
    yield
    if started:
        dist.destroy_process_group()
