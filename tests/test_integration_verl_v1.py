"""verl 0.9.1's v1 trainer (trainer.use_v1, the default) with DelTA: verl's own PPOTrainer step
methods (_balance_batch's padding, _compute_old_log_prob, _compute_ref_log_prob,
_compute_advantage with GRPO, _update_actor's fetch), its worker method, TrainingWorker and FSDP
engine forward (padded and packed), its hydra config and validate_config; TransferQueue is an
in-memory store (tests/verl_standins.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("transfer_queue")
import delta_kernels.integrations.verl as dv  # noqa: E402

if dv.V1_SKIPPED is not None:
    pytest.skip(f"verl's v1 trainer does not import here: {dv.V1_SKIPPED}", allow_module_level=True)
import numpy as np  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss_vanilla  # noqa: E402
from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

import delta_kernels as dk  # noqa: E402
from delta_kernels.integrations import response_hidden_states, verl_v1  # noqa: E402
from integration_models import context_free_model, tiny_model  # noqa: E402
from test_integration_verl import cpu_device, process_group  # noqa: E402,F401
from verl_standins import (UIDS, MemoryTQ, padded, padded_batch, plain_run, scores, step, trainer_on,  # noqa: E402
                           use_store, v1_config)

ON = {"+algorithm.delta.enable": "true", "+algorithm.delta.k": 2, "+algorithm.delta.sketch_dim": 8,
      "+algorithm.delta.backend": "torch", "trainer.v1.trainer_mode": "delta_sync"}


@pytest.fixture
def store(monkeypatch):
    """One in-memory TransferQueue for verl's trainer, its padding helper and the plugin."""
    tq = MemoryTQ()
    use_store(tq, monkeypatch.setattr)
    return tq


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_v1_step_folds_delta_into_grpo_advantages(store, packed):
    """Advantages == GRPO's x delta_coefficients(backend="torch") on the hidden states entering
    the head; one forward per pass; no vectors fetched by the ref or update pass; padding
    samples get coefficient 0; the seven delta/* metrics."""
    model = context_free_model() if packed else tiny_model()
    td = padded_batch(2)
    trainer = trainer_on(store, model, packed, **ON)
    assert type(trainer) is verl_v1.DeltaPPOTrainerSync
    meta, metrics = step(trainer, store, td)
    actor, ref_wg = trainer.actor_rollout_wg, trainer.ref_policy_wg
    assert dv.VECTORS_KEY in actor.written[0] and dv.VECTORS_KEY not in ref_wg.written[0]  # old pass only
    assert len(actor.written) == 1 and len(ref_wg.written) == 1  # one forward per pass: no extra one
    fetched = actor.fetched + ref_wg.fetched  # old, update; ref
    assert len(fetched) == 3 and all(dv.VECTORS_KEY not in f for f in fetched)
    assert dv.VECTORS_KEY not in meta.fields and dv.SPEC_KEY not in (meta.extra_info or {})

    real = meta.keys[:len(UIDS)]
    mask = td["response_mask"].bool()
    rewards = torch.zeros(mask.shape)
    rewards[torch.arange(len(UIDS)), mask.sum(1) - 1] = scores()
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask.long(), np.array(UIDS, dtype=object))
    with torch.no_grad():
        body = model.model(input_ids=td["input_ids"], attention_mask=td["attention_mask"],
                           position_ids=td["position_ids"]).last_hidden_state
    h = response_hidden_states(body, mask.shape[1], attention_mask=td["attention_mask"])
    old = padded(store, real, "old_log_probs")
    ref = dk.delta_coefficients(h.double(), old.double() * mask, grpo.double(), mask, k=2, sketch_dim=8,
                                backend="torch")
    got = padded(store, real, "advantages")
    torch.testing.assert_close(got.double(), ref.weighted_advantages, rtol=1e-4, atol=1e-5)
    assert float((ref.coef[mask] - 1).abs().max()) > 1e-2
    assert float(padded(store, meta.keys[len(UIDS):], "advantages").abs().max()) == 0
    coef = ref.coef[mask].float()
    assert metrics["delta/coef_max"] == pytest.approx(float(coef.max()), rel=1e-4)
    assert metrics["delta/coef_std"] == pytest.approx(float(coef.std(unbiased=False)), rel=1e-3)
    assert set(k for k in metrics if k.startswith("delta/")) == {f"delta/{n}" for n in dv.core.METRIC_NAMES}

    # the gradient verl's policy loss takes from these advantages: a written-out dual-clip surrogate
    logp = (old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9))).clamp_max(0)
    logp = logp.detach().requires_grad_(True)
    cfg = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)  # verl's ActorConfig, as its workers build it
    loss, _ = compute_policy_loss_vanilla(old, logp, got, mask.long(), "token-mean", cfg)
    (theirs,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().double().requires_grad_(True)
    ratio, a = torch.exp(logp2 - old.double()), ref.weighted_advantages
    low, high, c = cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - low, 1 + high))
    per_token = torch.where(a < 0, torch.minimum(clipped, -a * c), clipped)
    (ours,) = torch.autograd.grad((per_token * mask).sum() / mask.sum(), logp2)
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-4, atol=1e-7)


OFF_SCRIPT = r"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM
import verl_standins
torch.distributed.init_process_group("gloo", init_method="file://" + os.path.abspath("pg"), rank=0, world_size=1)
import verl.workers.engine.fsdp.transformer_impl as ti
ti.get_device_id = ti.get_device_name = lambda: "cpu"
out = verl_standins.plain_run(AutoModelForCausalLM.from_pretrained(sys.argv[1]))
out["delta_kernels_loaded"] = any(m.startswith("delta_kernels") for m in sys.modules)
print(json.dumps(out))
"""


def test_v1_off_equals_plain_verl_bit_for_bit(store, tmp_path):
    """DelTA off (no algorithm.delta, trainer_mode=delta_sync): the advantages, old log-probs
    and fetched fields equal verl's PPOTrainerSync in a process where verl's plugins are off
    and delta_kernels is never imported."""
    from transformers import AutoModelForCausalLM
    tiny_model().save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ours = plain_run(model, **{"trainer.v1.trainer_mode": "delta_sync"})
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env.update(VERL_USE_EXTERNAL_PLUGINS="none", PYTHONPATH=here)
    res = subprocess.run([sys.executable, "-c", OFF_SCRIPT, str(tmp_path / "model")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert theirs.pop("delta_kernels_loaded") is False
    assert theirs == ours


def test_v1_refusals(store):
    """bypass mode; workers without the capture; a trainer_mode that is not DelTA's (verl's own
    validate_config, patched); the legacy fold stays inert inside v1 (else it would raise for
    missing legacy vectors); the registry entry."""
    td = padded_batch(2)
    bypass = trainer_on(store, tiny_model(), False, **ON, **{"algorithm.rollout_correction.bypass_mode": "true"})
    with pytest.raises(ValueError, match="algorithm.rollout_correction.bypass_mode"):
        step(bypass, store, td)
    plain_workers = trainer_on(store, tiny_model(), False, **ON)
    plain_workers.actor_rollout_wg.method = lambda self, data: (
        data.set_non_tensor(dv.SPEC_KEY, None), self.actor.infer_batch(data).cpu())[1]
    with pytest.raises(RuntimeError, match="delta_kernels.integrations.verl"):
        step(plain_workers, store, td)
    from verl.trainer.main_ppo import validate_config
    cfg = v1_config(**{k: v for k, v in ON.items() if k != "trainer.v1.trainer_mode"})
    assert validate_config._delta_kernels_patch
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode: 'sync' is not a DelTA trainer.*delta_sync"):
        dv.check_trainer(cfg)
    dv.check_trainer(v1_config(**ON))
    assert get_trainer_cls("delta_sync") is verl_v1.DeltaPPOTrainerSync
    assert issubclass(verl_v1.DeltaPPOTrainerSync, PPOTrainerSync)
    assert dv.INSTALLED["v1.delta_sync"] == "registered"
