"""capture_hidden_states / response_hidden_states on a tiny Qwen3 built from a config."""
import pytest
import torch

from delta_kernels.integrations import capture_hidden_states, decoder_body, response_hidden_states
from integration_models import tiny_model

pytest.importorskip("transformers")


def _batch(seed=0, b=3, s=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 17, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :2] = 0  # left-padded prompt
    mask[2, -3:] = 0  # right-padded response
    return ids, mask


def test_capture_equals_the_head_input_and_is_detached():
    model = tiny_model()
    ids, mask = _batch()
    with capture_hidden_states(model) as cap:
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    h = cap.pop()
    assert not h.requires_grad and h.grad_fn is None
    assert torch.equal(h, out.hidden_states[-1].detach())
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(h), out.logits.detach(), rtol=1e-6, atol=1e-6)


def test_capture_without_calling_lm_head_and_hook_removed():
    model = tiny_model()
    ids, mask = _batch(1)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    with capture_hidden_states(model) as cap:
        model.model(ids, attention_mask=mask)  # the body alone, as fused heads do
    assert len(cap.hidden_states) == 1 and not calls
    model.model(ids, attention_mask=mask)
    assert len(cap.hidden_states) == 1  # removed on exit
    with pytest.raises(RuntimeError, match="boom"):
        with capture_hidden_states(model) as cap2:
            raise RuntimeError("boom")
    model.model(ids, attention_mask=mask)
    assert cap2.hidden_states == []  # removed on exception too


def test_capture_through_peft():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = _batch(2)
    with capture_hidden_states(model) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(cap.pop(), out.hidden_states[-1].detach())


def test_response_alignment_matches_logprobs():
    """hidden[:, S-R-1 : S-1] through the head gives the log-probs of the R response tokens."""
    model = tiny_model()
    ids, mask = _batch(3)
    r = 4
    with torch.no_grad(), capture_hidden_states(model) as cap:
        logits = model(ids, attention_mask=mask).logits
    h = response_hidden_states(cap.pop(), r, attention_mask=mask)
    lp_from_h = torch.log_softmax(model.get_output_embeddings()(h), -1).gather(-1, ids[:, -r:, None])[..., 0]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0][:, -r:]
    torch.testing.assert_close(lp_from_h, lp, rtol=1e-5, atol=1e-5)


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="model: Linear exposes no decoder body"):
        decoder_body(torch.nn.Linear(3, 3))
    h = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="response_length"):
        response_hidden_states(h, 6)
    bad = torch.ones(2, 6, dtype=torch.long)
    bad[0, 1] = 0  # prompt not ending before the responses: right-padded prompt
    with pytest.raises(ValueError, match="attention_mask: .*left-pad"):
        response_hidden_states(h, 4, attention_mask=bad)


def test_sharded_head_input_is_refused(tmp_path):
    """A DTensor LM head sharded on the hidden dim (row-parallel): its input is split over ranks."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_model()
        mesh = init_device_mesh("cpu", (1,))
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match="model: lm_head.weight is a DTensor sharded on the hidden dimension"):
            decoder_body(model)
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.full_tensor().detach(), mesh, [Shard(0)]))
        assert decoder_body(model) is model.model
    finally:
        dist.destroy_process_group()
