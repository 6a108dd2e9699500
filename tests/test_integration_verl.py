"""verl 0.9.1 integration: worker capture and driver fold on tensors and DataProtos laid out as
verl builds them: a left/right-padded batch -> verl's left_right_2_no_padding -> verl's own FSDP
engine forward (dynamic micro-batches, packed or padded model inputs, jagged log-probs) with the
patched forward_step -> verl's no_padding_2_padding -> the fold after compute_advantage."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("tensordict")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

import delta_kernels as dk  # noqa: E402
from delta_kernels.integrations import response_hidden_states  # noqa: E402
from delta_kernels.integrations import verl as dv  # noqa: E402
from integration_models import context_free_model, tiny_model  # noqa: E402
from verl_standins import B, R, cpu_engine, padded_batch, training_worker  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl as ti  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """verl's engine all-reduces the token count over its data-parallel group: one gloo rank."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def cpu_device(monkeypatch):
    """verl's FSDP engine asks its platform for the device; on this CPU-only machine it is the CPU."""
    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")


def worker_outputs(model, data, packed, temperature=1.0):
    """verl's engine forward over a no-padding TensorDict (non-tensor fields such as the DelTA
    spec travel with it), dynamic micro-batches of <= 16 tokens: {key: jagged [B, j1, ...]}."""
    tu.assign_non_tensor(data, use_remove_padding=packed, use_dynamic_bsz=True, max_token_len_per_gpu=16,
                         temperature=temperature, calculate_entropy=True)
    with torch.no_grad():
        return cpu_engine(model).forward_backward_batch(data, None, forward_only=True)["model_output"]


def worker_pass(model, td, spec, packed, temperature=1.0):
    """The worker side on a padded batch: {key: [B, R, ...]} through verl's no_padding_2_padding."""
    data = left_right_2_no_padding(td.clone())
    tu.assign_non_tensor(data, **{dv.SPEC_KEY: dict(spec.kwargs(), temperature=1.0)})
    joined = worker_outputs(model, data, packed, temperature)
    return {k: no_padding_2_padding(v, td) for k, v in joined.items()}


def algorithm(**delta):
    return OmegaConf.create({"delta": dict(enable=True, **delta)})


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("sketch_dim", [None, 16], ids=["exact", "sketch"])
def test_coefficients_equal_delta_coefficients(packed, sketch_dim):
    model = (context_free_model() if packed else tiny_model()).eval()
    td = padded_batch()
    spec = dv.DeltaSpec(k=2, sketch_dim=sketch_dim, backend="torch")
    out = worker_pass(model, td, spec, packed)
    mask = td["response_mask"].bool()
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(B, generator=g)
    adv = scores[:, None] * mask
    data = DataProto.from_dict(tensors=dict(responses=td["responses"], response_mask=td["response_mask"],
                                            old_log_probs=out["log_probs"], advantages=adv.clone()))
    res = dv.fold_delta_into_advantages(data, algorithm(k=2, sketch_dim=sketch_dim, backend="torch"),
                                        out[dv.VECTORS_KEY])
    # reference: the hidden states entering the head, response-aligned, from a plain padded forward
    with torch.no_grad():
        body = model.model(input_ids=td["input_ids"], attention_mask=td["attention_mask"],
                           position_ids=td["position_ids"]).last_hidden_state
    h = response_hidden_states(body, R, attention_mask=td["attention_mask"])
    logp = out["log_probs"].double() * mask
    ref = dk.delta_coefficients(h.double(), logp, scores.double(), mask, k=2, sketch_dim=sketch_dim, backend="torch")
    torch.testing.assert_close(res.coef.double(), ref.coef, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(data.batch["advantages"].double(), ref.weighted_advantages, rtol=1e-4, atol=1e-4)
    assert data.meta_info["delta_metrics"]["delta/coef_std"] > 0.01


def test_folded_advantages_through_verl_policy_loss():
    """verl's compute_policy_loss_vanilla (token-mean) on the folded advantages ==
    clipped_surrogate_loss(coef=...) on the plain ones."""
    td = padded_batch(1)
    out = worker_pass(tiny_model(), td, dv.DeltaSpec(k=1, sketch_dim=8), packed=True)
    mask = td["response_mask"]
    scores = torch.randn(B, generator=torch.Generator().manual_seed(4))
    data = DataProto.from_dict(tensors=dict(response_mask=mask, old_log_probs=out["log_probs"],
                                            advantages=scores[:, None] * mask))
    res = dv.fold_delta_into_advantages(data, algorithm(k=1, sketch_dim=8), out[dv.VECTORS_KEY])
    old = out["log_probs"] * mask
    logp = (old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5))).clamp_max(0) * mask
    cfg = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                                global_batch_info={}))
    theirs, _ = compute_policy_loss_vanilla(old, logp, data.batch["advantages"], mask, "token-mean", cfg)
    ours, _ = dk.clipped_surrogate_loss(logp, old, scores, mask.bool(), coef=res.coef, clip_low=0.2, clip_high=0.28,
                                        clip_c=3.0, agg="token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bad_use_is_refused():
    data = DataProto.from_dict(tensors=dict(response_mask=torch.ones(2, 3), old_log_probs=-torch.rand(2, 3),
                                            advantages=torch.randn(2, 3)))
    with pytest.raises(ValueError, match="VERL_USE_EXTERNAL_MODULES=delta_kernels.integrations.verl"):
        dv.fold_delta_into_advantages(data, algorithm(k=1), None)
    assert dv.fold_delta_into_advantages(data, OmegaConf.create({"delta": {"enable": False}}), None) is None
    with pytest.raises(ValueError, match="temperature: log-probs are computed at temperature 1.0 but .* 0.7"):
        dv.check_temperature(0.7, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        worker_pass(tiny_model(), padded_batch(), dv.DeltaSpec(), packed=True, temperature=0.5)
    assert dv.install()["FSDPEngineWithLMHead.forward_step"] == "already patched"


class WorkerGroup:
    """The actor worker group as the driver sees it: compute_log_prob(TensorDict) is verl's
    ActorRolloutRefWorker.compute_log_prob (``actor.infer_batch(data).cpu()``) on verl's
    TrainingWorker and engine, the forward_step DelTA-patched unless ``capture`` is False."""

    def __init__(self, model, capture=True):
        self.worker, self.capture, self.calls = training_worker(model), capture, 0

    def compute_log_prob(self, data):
        self.calls += 1
        if not self.capture:  # workers without the plugin: verl's forward_step unpatched
            tu.assign_non_tensor(data, **{dv.SPEC_KEY: None})
        return self.worker.infer_batch(data).cpu()


def driver(model, delta=dict(enable=True, k=1, sketch_dim=8), capture=True):
    config = OmegaConf.create(dict(algorithm={"delta": delta, "adv_estimator": "grpo"}, trainer=dict(use_v1=False),
                                   actor_rollout_ref=dict(rollout=dict(temperature=1.0), actor={})))
    return SimpleNamespace(config=config, actor_rollout_wg=WorkerGroup(model, capture))


def test_driver_patches_on_verls_own_trainer_functions():
    """verl's own RayPPOTrainer._compute_old_log_prob, compute_advantage (GRPO) and
    compute_data_metrics, patched by install(), on a padded batch: the folded advantages are
    GRPO's times delta_coefficients on the hidden states entering the head, the vectors never
    enter the batch, and the delta/* metrics reach the fit loop's metrics dict."""
    import numpy as np
    from verl.trainer.ppo import ray_trainer as rt
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    assert dv.INSTALLED["RayPPOTrainer._compute_old_log_prob"] in ("patched", "already patched")
    model = tiny_model()
    td = padded_batch(2)
    mask = td["response_mask"]
    rewards = torch.randn(B, R, generator=torch.Generator().manual_seed(6)) * mask
    uid = np.array(["a", "a", "b", "b", "b"], dtype=object)
    trainer = driver(model)

    tokens = td["attention_mask"].sum(-1).tolist()  # the fit loop's global_token_num
    batch = DataProto.from_dict(tensors={k: td[k] for k in td.keys()}, non_tensors=dict(uid=uid),
                                meta_info={"temperature": 1.0, "global_token_num": tokens})
    old, mfu = rt.RayPPOTrainer._compute_old_log_prob(trainer, batch)
    assert mfu == pytest.approx(sum(tokens) / 1e3 / 3)  # verl's forward-only mfu, through the worker's metrics
    assert dv.VECTORS_KEY not in old.batch.keys() and trainer.actor_rollout_wg.calls == 1
    batch = batch.union(old)
    batch.batch["token_level_scores"] = batch.batch["token_level_rewards"] = rewards
    batch = rt.compute_advantage(batch, adv_estimator="grpo", num_repeat=1, config=trainer.config.algorithm)

    plain, _ = compute_grpo_outcome_advantage(rewards, mask, uid)
    with torch.no_grad():
        body = model.model(input_ids=td["input_ids"], attention_mask=td["attention_mask"],
                           position_ids=td["position_ids"]).last_hidden_state
    h = response_hidden_states(body, R, attention_mask=td["attention_mask"])
    logp = batch.batch["old_log_probs"].double() * mask
    ref = dk.delta_coefficients(h.double(), logp, plain.double(), mask.bool(), k=1, sketch_dim=8, backend="torch")
    torch.testing.assert_close(batch.batch["advantages"].double(), ref.weighted_advantages, rtol=1e-4, atol=1e-5)
    assert float((ref.coef[mask.bool()] - 1).abs().max()) > 1e-2  # the fold changed the advantages

    metrics = rt.compute_data_metrics(batch=batch, use_critic=False)
    assert "critic/advantages/mean" in metrics  # verl's own metrics, plus ours
    for name in ("coef_std", "coef_min", "coef_max", "gamma_pos", "gamma_neg", "n_pos", "n_neg"):
        assert metrics[f"delta/{name}"] == batch.meta_info[dv.METRICS_KEY][f"delta/{name}"]
    torch.testing.assert_close(torch.tensor(metrics["delta/coef_max"]), ref.coef[mask.bool()].max().float())


def test_driver_refuses_what_would_silently_drop_delta(monkeypatch):
    """Workers without the capture, a batch reordered between the passes, a temperature
    mismatch, verl's v1 trainer in a mode that is not DelTA's: each refused, naming what to change."""
    from verl.trainer.ppo import ray_trainer as rt
    from verl.utils import config as verl_config
    td = padded_batch(2)

    def batch(temperature=1.0):
        return DataProto.from_dict(tensors={k: td[k] for k in td.keys()},
                                   meta_info={"temperature": temperature, "global_token_num": [1] * B})
    with pytest.raises(RuntimeError, match="worker-side capture is not installed"):
        rt.RayPPOTrainer._compute_old_log_prob(driver(tiny_model(), capture=False), batch())
    with pytest.raises(ValueError, match="temperature: log-probs are computed at temperature 0.6"):
        rt.RayPPOTrainer._compute_old_log_prob(driver(tiny_model()), batch(0.6))
    rt.RayPPOTrainer._compute_old_log_prob(driver(tiny_model()), batch())
    with pytest.raises(ValueError, match="responses: the batch changed"):
        dv.PENDING.take(td["responses"].flip(0))
    assert dv.PENDING.take(td["responses"]) is None  # taken (and dropped) by the refused call
    off = driver(tiny_model(), delta=dict(enable=False))
    result, _ = rt.RayPPOTrainer._compute_old_log_prob(off, batch())  # DelTA off: verl's own pass, untouched
    assert dv.PENDING.take(td["responses"]) is None and "old_log_probs" in result.batch.keys()

    assert verl_config.validate_config._delta_kernels_patch
    v1 = driver(tiny_model()).config
    v1.trainer.use_v1 = True
    v1.trainer.v1 = {"trainer_mode": "sync"}
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode: 'sync' is not a DelTA trainer.*"
                                         "trainer.v1.trainer_mode=delta_sync"):
        dv.check_trainer(v1)
    seen = []
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode"):
        dv._validate_config_checking_trainer(lambda config, **kw: seen.append(kw))(config=v1, use_critic=False)
    assert seen == [{"use_critic": False}]  # verl's own check ran first
    v1.trainer.v1.trainer_mode = "delta_sync"
    dv.check_trainer(v1)
    dv.check_trainer(driver(tiny_model()).config)
    dv.check_trainer(OmegaConf.create(dict(trainer=dict(use_v1=True, v1=dict(trainer_mode="sync")), algorithm={})))
    monkeypatch.setattr(dv, "V1_SKIPPED", "ModuleNotFoundError: No module named 'transfer_queue'")
    with pytest.raises(ValueError, match="v1 trainer could not be imported here .*transfer_queue.*trainer.use_v1=False"):
        dv.check_trainer(v1)  # delta_sync asked for, but not registered in this environment


def import_verl_in_a_subprocess(env, pythonpath):
    """``import verl`` in a fresh interpreter: which DelTA patches are installed."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import verl\nfrom verl.workers.engine.fsdp import transformer_impl as ti\n"
            "from verl.trainer.ppo import ray_trainer as rt\nfrom verl.utils import config\n"
            "for f in (ti.FSDPEngineWithLMHead.forward_step, rt.RayPPOTrainer._compute_old_log_prob,\n"
            "          rt.compute_advantage, rt.compute_data_metrics, config.validate_config):\n"
            "    print(getattr(f, '_delta_kernels_patch', False))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")},
           "PYTHONPATH": os.pathsep.join([root, *pythonpath]), **env}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()


def test_enabled_through_verl_external_modules():
    """VERL_USE_EXTERNAL_MODULES=delta_kernels.integrations.verl: `import verl` installs the five patches."""
    out = import_verl_in_a_subprocess({"VERL_USE_EXTERNAL_MODULES": "delta_kernels.integrations.verl",
                                       "VERL_USE_EXTERNAL_PLUGINS": "none"}, [])
    assert out == ["True"] * 5, out


def test_enabled_through_the_declared_verl_plugins_entry_point(tmp_path):
    """The entry point pyproject.toml declares, as an installed distribution's metadata: verl's
    own entry-point discovery at `import verl` loads it and the patches are in place."""
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    points = project["project"]["entry-points"]["verl.plugins"]
    assert points == {"delta_kernels": "delta_kernels.integrations.verl"}
    info = tmp_path / "delta_kernels_plugin_probe-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: delta-kernels-plugin-probe\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[verl.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    env = {"VERL_USE_EXTERNAL_PLUGINS": "delta_kernels"}
    assert import_verl_in_a_subprocess(env, [str(tmp_path)]) == ["True"] * 5
    assert import_verl_in_a_subprocess({"VERL_USE_EXTERNAL_PLUGINS": "none"}, [str(tmp_path)]) == ["False"] * 5
