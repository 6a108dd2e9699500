"""OpenRLHF 0.11.2 with DelTA, on OpenRLHF's own code (tests/openrlhf_pipeline.py: its CLI parser,
RemoteExperienceMaker, RayActorGroup, PolicyModelActor's decoration-time Ray class, Actor,
ActorPPOTrainer.training_step, PolicyLoss with dual clip), padded and packed, tiny CPU models."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("openrlhf")
pytest.importorskip("deepspeed")
import openrlhf_pipeline as pipe  # noqa: E402

pipe.use_import_standins()
import ray  # noqa: E402

import delta_kernels as dk  # noqa: E402
from delta_kernels.integrations import openrlhf as do  # noqa: E402
from integration_models import context_free_model, tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def standins(monkeypatch):
    pipe.use_standins(monkeypatch.setattr)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    yield
    do.disable_delta()


def reference(model, rollouts, experiences):
    """GRPO (group_norm) advantages and per-sample hidden states from plain padded forwards,
    flat over the experiences' valid action tokens in their order: (h [N, H], logp, adv)."""
    rewards = torch.cat([r.rewards for r in rollouts]).reshape(-1, 2)
    norm = ((rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)).reshape(-1)
    hs, logps, advs = [], [], []
    for e in experiences:
        for row, i in enumerate(e.index):
            seq = rollouts[i].sequences
            with torch.no_grad():
                h = model.model(input_ids=seq).last_hidden_state[0, :-1]
            m = rollouts[i].action_mask[0].bool()
            hs.append(h[m])
            valid = e.action_mask[row].bool()
            logps.append(e.action_log_probs[row][valid])
            advs.append(norm[i].expand(int(m.sum())))
    return torch.cat(hs), torch.cat(logps), torch.cat(advs)


def dual_clip_grads(model, experience, adv, args):
    """Gradients of the written-out dual-clip PPO surrogate (token mean) at the model's weights."""
    model.zero_grad()
    seq, attn, mask = experience.sequences, experience.attention_mask, experience.action_mask.bool()
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, seq[:, 1:, None])[..., 0][:, -mask.shape[1]:]
    ratio = torch.exp(logp - experience.action_log_probs)
    low, high = args.actor.eps_clip_low_high
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    per_token = torch.where(adv < 0, torch.minimum(clipped, -adv * args.actor.dual_clip), clipped)
    ((per_token * mask).sum() / mask.sum()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_step_folds_delta_into_grpo_advantages(packed):
    """Advantages == GRPO's x delta_coefficients(backend="torch") over all experiences (one
    accumulator); one body forward per experience; the vectors leave the actors only through
    __ray_call__; the update pass's gradients == the written-out dual-clip surrogate's; metrics."""
    model = context_free_model() if packed else tiny_model()
    do.enable_delta(k=2, sketch_dim=8, backend="torch")
    args = pipe.cli_args(pipe.argv(packed))
    group = pipe.policy_group(model, args)
    rollouts = pipe.rollouts(args)
    calls = []
    handle = model.model.register_forward_hook(lambda *a: calls.append(1))
    experiences = pipe.experience_maker(group, args).make_experience_batch(rollouts)
    handle.remove()
    assert len(calls) == len(experiences) == 3  # one policy forward per micro batch, none extra
    assert all(do._STASH not in h._instance.__dict__ for h in group._actor_handlers)
    for e in experiences:  # nothing of DelTA's travels with the experiences
        assert all(not (isinstance(v, torch.Tensor) and v.dim() == 3) for v in vars(e).values())

    h, logp, adv = reference(model, rollouts, experiences)
    ref = dk.delta_coefficients(h.double(), logp.double(), adv.double(), torch.ones_like(logp, dtype=torch.bool),
                                k=2, sketch_dim=8, backend="torch")
    got = torch.cat([e.advantages[e.action_mask.bool()] for e in experiences])
    torch.testing.assert_close(got.double(), ref.weighted_advantages, rtol=1e-4, atol=1e-5)
    assert float((ref.coef - 1).abs().max()) > 1e-2
    assert all(float(e.advantages[~e.action_mask.bool()].abs().sum()) == 0 for e in experiences)

    from openrlhf.trainer.ppo_trainer import PPOTrainer
    cls = PPOTrainer.__ray_metadata__.modified_class
    stats = cls._compute_rollout_stats(object.__new__(cls), experiences)
    assert "rollout/reward_mean" in stats  # OpenRLHF's own, plus ours
    assert {k for k in stats if k.startswith("delta/")} == {f"delta/{n}" for n in dk.integrations.core.METRIC_NAMES}
    assert stats["delta/coef_max"] == pytest.approx(float(ref.coef.max()), rel=1e-4)

    trainer = pipe.actor_trainer(model, args)
    start = 0
    for e in experiences:
        n = int(e.action_mask.sum())
        folded = torch.zeros(e.action_mask.shape, dtype=torch.float64)
        folded[e.action_mask.bool()] = ref.weighted_advantages[start:start + n]
        start += n
        model.zero_grad()
        trainer.training_step(e, kl_ctl=0.0, step=0, loss_batch_info={})
        theirs = [p.grad.clone() for p in model.parameters()]
        ours = dual_clip_grads(model, e, folded.float(), args)
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert len(calls) == len(experiences)  # the update pass's forwards ran without the capture hook
    assert all(do._STASH not in h._instance.__dict__ for h in group._actor_handlers)


OFF_SCRIPT = r"""
import json, sys
from transformers import AutoModelForCausalLM
import openrlhf_pipeline as pipe
pipe.use_import_standins()
pipe.use_standins()
out = pipe.run_step(AutoModelForCausalLM.from_pretrained(sys.argv[1]))
out["delta_kernels_loaded"] = any(m.startswith("delta_kernels") for m in sys.modules)
print(json.dumps(out))
"""


def test_off_equals_plain_openrlhf_bit_for_bit(tmp_path):
    """The patches installed but off (k=None): advantages, old log-probs and gradients equal
    OpenRLHF's in a process that never imports delta_kernels."""
    from transformers import AutoModelForCausalLM
    tiny_model().save_pretrained(tmp_path / "model")
    do.enable_delta(k=None)
    assert do.delta_spec() is None
    ours = pipe.run_step(AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != do.ENV}
    env["PYTHONPATH"] = here
    res = subprocess.run([sys.executable, "-c", OFF_SCRIPT, str(tmp_path / "model")], env=env, capture_output=True,
                         text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert theirs.pop("delta_kernels_loaded") is False
    assert theirs == ours


class Started(Exception):
    pass


def test_python_m_entry_runs_openrlhfs_cli_with_the_hook(monkeypatch):
    """`python -m delta_kernels.integrations.openrlhf --delta.* <train_ppo_ray args>`: the
    --delta options switch DelTA on, OpenRLHF's own CLI parses the rest and its ray.init gets
    the worker hook and the options; a worker's setup_worker installs the same spec."""
    seen = {}

    def init(*args, runtime_env=None, **kwargs):
        seen.update(runtime_env)
        raise Started
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Started):
        do.main(["--delta.k", "1", "--delta.sketch_dim=16", "--delta.lam_max", "1.3", *pipe.argv()])
    assert seen["worker_process_setup_hook"] == "delta_kernels.integrations.openrlhf.setup_worker"
    assert "TOKENIZERS_PARALLELISM" in seen["env_vars"]  # OpenRLHF's own env_vars kept
    assert json.loads(seen["env_vars"][do.ENV]) == do.DeltaSpec(k=1, sketch_dim=16, lam_max=1.3).kwargs()
    assert do.delta_spec() == do.DeltaSpec(k=1, sketch_dim=16, lam_max=1.3)
    code = ("import openrlhf_pipeline as p; p.use_import_standins()\n"
            "from delta_kernels.integrations import openrlhf as o\n"
            "from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker as M\n"
            "assert o.delta_spec() is None; o.setup_worker()\n"
            "print(o.delta_spec().kwargs(), M.compute_advantages_and_returns._delta_kernels_patch)")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, do.ENV: seen["env_vars"][do.ENV],
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"{do.DeltaSpec(k=1, sketch_dim=16, lam_max=1.3).kwargs()} True"


def test_refusals(monkeypatch):
    """Ray already up; unknown and bad options; ring attention; policy actors without the
    forward patch; a PPO-trainer process without the hook; a foreign setup hook."""
    with pytest.raises(SystemExit, match="--delta.kk: unknown DelTA option"):
        do.split_args(["--delta.kk", "1"])
    with pytest.raises(ValueError, match="k"):
        do.enable_delta(k=-1)
    with pytest.raises(ValueError, match="delta: unknown keys"):
        do.delta_runtime_env(k=1, lr=3)
    with pytest.raises(ValueError, match="vectors: 'head' is not supported by the OpenRLHF adapter"):
        do.delta_runtime_env(k=1, vectors="head", vocab_sketch_dim=4)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="Ray is already initialized.*delta_runtime_env"):
        do.enable_delta(k=1)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    do.enable_delta(k=1)
    args = pipe.cli_args(pipe.argv())
    group = pipe.policy_group(tiny_model(), args)
    group._actor_handlers[0]._instance.strategy.ring_attn_group = object()
    with pytest.raises(ValueError, match="ds.ring_attn_size"):
        pipe.experience_maker(group, args).make_experience_batch(pipe.rollouts(args))

    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    cls = PolicyModelActor.__ray_metadata__.modified_class
    monkeypatch.setattr(cls, "forward", cls.forward.__wrapped__)  # actors created before enable_delta
    with pytest.raises(RuntimeError, match="0 vector batches for 3 experiences.*enable_delta"):
        pipe.experience_maker(pipe.policy_group(tiny_model(), args), args).make_experience_batch(pipe.rollouts(args))

    from openrlhf.trainer.ppo_trainer import PPOTrainer
    trainer_cls = PPOTrainer.__ray_metadata__.modified_class
    with pytest.raises(RuntimeError, match="worker_process_setup_hook"):
        trainer_cls._compute_rollout_stats(object.__new__(trainer_cls), pipe.rollouts(args))

    recorded = {}
    do.disable_delta()
    monkeypatch.setattr(ray, "init", lambda **kw: recorded.update(kw))
    do.enable_delta(k=1)
    with pytest.raises(ValueError, match="worker_process_setup_hook: already set"):
        ray.init(runtime_env={"worker_process_setup_hook": "other.hook"})
    ray.init(runtime_env={"env_vars": {"A": "1"}})
    assert recorded["runtime_env"]["env_vars"]["A"] == "1"


SHIP_SCRIPT = r"""
import os, pickle, sys
import openrlhf_pipeline as pipe
pipe.use_import_standins()
import ray
from ray._common.serialization import pickle_dumps
from ray.util.tracing.tracing_helper import _inject_tracing_into_class
if sys.argv[1] == "driver":
    from delta_kernels.integrations import openrlhf as do
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    ray.is_initialized = lambda: False
    do.enable_delta(k=1, sketch_dim=8, backend="torch")
    classes = [c.__ray_metadata__.modified_class for c in (PolicyModelActor, PPOTrainer)]
    with open(sys.argv[2], "wb") as f:
        pickle.dump([pickle_dumps(c, "actor class") for c in classes], f)
    print(os.environ[do.ENV])
else:  # a fresh worker: Ray's setup hook, then the actor classes as Ray loads them from the driver's bytes
    from delta_kernels.integrations import openrlhf as do
    do.setup_worker()
    with open(sys.argv[2], "rb") as f:
        policy, trainer = [pickle.loads(b) for b in pickle.load(f)]
    for cls in (policy, trainer):
        _inject_tracing_into_class(cls)
    pipe.use_standins()
    from integration_models import tiny_model
    args = pipe.cli_args(pipe.argv())
    actor = object.__new__(policy)
    actor.actor, actor.strategy = pipe.openrlhf_actor(tiny_model(), args), pipe.Strategy(args)
    e = pipe.rollouts(args)[0]
    actor.forward(e.sequences, e.action_mask, e.attention_mask)
    vectors = do._take_vectors(actor)
    do._LAST_METRICS["delta/coef_std"] = 0.5
    stats = trainer._compute_rollout_stats(object.__new__(trainer), [e])
    print(len(vectors), list(vectors[0].shape), stats["delta/coef_std"], do._LAST_METRICS)
"""


def test_ray_ships_the_patched_actor_classes(tmp_path):
    """What Ray does with the driver's patches: export the modified classes with its own
    serializer (driver process), load them in a fresh worker after the setup hook, re-inject
    tracing; the policy forward stashes its vectors and the rollout stats read the worker's metrics."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**{k: v for k, v in os.environ.items() if k != do.ENV},
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    path = str(tmp_path / "classes.pkl")
    driver = subprocess.run([sys.executable, "-c", SHIP_SCRIPT, "driver", path], env=env, capture_output=True,
                            text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    env[do.ENV] = driver.stdout.strip().splitlines()[-1]  # Ray's runtime_env env_vars
    worker = subprocess.run([sys.executable, "-c", SHIP_SCRIPT, "worker", path], env=env, capture_output=True,
                            text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert worker.stdout.strip().splitlines()[-1] == "1 [1, 8, 8] 0.5 {}"  # one forward: [1, S - 1, r]
