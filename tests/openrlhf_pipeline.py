"""OpenRLHF 0.11.2's own PPO step on this CPU machine, with stand-ins only for what cannot run
here: Ray's object store and actor handles (in process; a handle exposes only the methods Ray
recorded at decoration time, and calls them on an instance of ``__ray_metadata__.modified_class``
as a Ray worker does), DeepSpeed's backward/step (plain autograd, no update), the CUDA device
and sync, and the rollouts (given instead of vLLM's). OpenRLHF's CLI parser,
RemoteExperienceMaker.make_experience_batch, RayActorGroup.async_run_method_batch,
PolicyModelActor.execute_batch/forward, Actor, ActorPPOTrainer.training_step and PolicyLoss run
as they are. Imports no delta_kernels (the "off" run uses it in a process that never loads it)."""
from __future__ import annotations

import os
import runpy
import sys
from types import SimpleNamespace

import torch

STANDINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openrlhf_standins")


def use_import_standins() -> None:
    """vllm and flash_attn cannot install on a CPU-only machine: OpenRLHF's modules are imported
    with their import-time stand-ins, which then leave sys.path and sys.modules again (other
    packages, such as TRL, probe for a real vllm)."""
    import importlib
    import importlib.util
    missing = [m for m in ("vllm", "flash_attn") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    sys.path.append(STANDINS)
    try:
        for module in ("openrlhf.models", "openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ppo_trainer",
                       "openrlhf.trainer.ppo_utils.experience_maker", "openrlhf.cli.train_ppo_ray"):
            importlib.import_module(module)
    finally:
        sys.path.remove(STANDINS)
        for name in [n for n in sys.modules if n.split(".")[0] in missing]:
            del sys.modules[name]


class _Parsed(Exception):
    pass


def cli_args(argv):
    """OpenRLHF's own train_ppo_ray parser and checks on ``argv``: the hierarchical args its
    ``train(args)`` receives (stopped at get_strategy, before any Ray or DeepSpeed set-up)."""
    import ray
    import openrlhf.utils

    def grab(args):
        raise _Parsed(args)
    saved = openrlhf.utils.get_strategy, ray.is_initialized, sys.argv
    openrlhf.utils.get_strategy, ray.is_initialized, sys.argv = grab, (lambda: True), ["train_ppo_ray", *argv]
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except _Parsed as e:
        return e.args[0]
    finally:
        openrlhf.utils.get_strategy, ray.is_initialized, sys.argv = saved
    raise AssertionError("train_ppo_ray did not reach train(args)")


def argv(packed=False):
    out = ["--actor.model_name_or_path", "tiny", "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "2",
           "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2",
           "--rollout.batch_size", "3", "--rollout.micro_batch_size", "2", "--actor.dual_clip", "3.0",
           "--actor.eps_clip_low_high", "0.2", "0.28"]
    return out + (["--ds.packing_samples", "--vllm.num_engines", "1"] if packed else [])


class Ref:
    def __init__(self, value):
        self.value = value


class ObjectStore:
    """ray.put / ray.get in process."""

    def put(self, value):
        return Ref(value)

    def get(self, refs):
        return [r.value for r in refs] if isinstance(refs, list) else refs.value


class Handle:
    """An actor handle: ``.method.remote(...)`` for the methods Ray recorded when the class was
    decorated (``__ray_metadata__.method_meta``), run on the modified class's instance."""

    def __init__(self, actor_class, instance):
        self._methods = set(actor_class.__ray_metadata__.method_meta.methods)
        self._instance = instance

    def __getattr__(self, name):
        if name not in self._methods:
            raise AttributeError(f"'ActorHandle' object has no attribute '{name}'")
        method = getattr(self._instance, name)

        def remote(*args, **kwargs):  # Ray resolves top-level object refs among the arguments
            args = [a.value if isinstance(a, Ref) else a for a in args]
            return Ref(method(*args, **{k: v.value if isinstance(v, Ref) else v for k, v in kwargs.items()}))
        return SimpleNamespace(remote=remote)


class Strategy:
    """DeepspeedStrategy's surface the step uses: plain autograd backward, no optimizer step."""

    def __init__(self, args):
        self.args, self.ring_attn_group = args, None

    def is_rank_0(self):
        return True

    def print(self, *a):
        pass

    def backward(self, loss, model, optimizer):
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name="model"):
        pass

    def get_grad_norm(self, model):
        return 0.0


def use_standins(setattr_=setattr):
    """Route ray.put/get to the in-process store; CUDA device and sync calls to the CPU; no
    replay buffer (training_step is given its loss_batch_info)."""
    import ray
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    store = ObjectStore()
    setattr_(ray, "put", store.put)
    setattr_(ray, "get", store.get)
    setattr_(torch.cuda, "current_device", lambda: "cpu")
    setattr_(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    setattr_(ppo_actor, "NaiveReplayBuffer", lambda *a, **kw: None)  # places itself on cuda:N; the step skips it


def openrlhf_actor(model, args):
    """OpenRLHF's Actor around a built model (its from-a-path branch also sets packing_samples)."""
    from openrlhf.models import Actor
    actor = Actor(model)
    actor.packing_samples = args.ds.packing_samples
    return actor


def policy_group(model, args, n_actors=2):
    """OpenRLHF's RayActorGroup over ``n_actors`` PolicyModelActor handles sharing ``model``."""
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    handles = []
    for _ in range(n_actors):
        inst = object.__new__(PolicyModelActor.__ray_metadata__.modified_class)
        inst.actor = openrlhf_actor(model, args)
        inst.strategy = Strategy(args)
        handles.append(Handle(PolicyModelActor, inst))
    group = object.__new__(RayActorGroup)
    group._actor_handlers, group.duplicate_actors = handles, 1
    return group


def rollouts(args, seed=0, vocab=17):
    """One Experience per response, as SamplesGenerator builds them from vLLM's output:
    sequences [1, S] = prompt + response, action_mask [1, S - 1] over the response, a reward."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    g = torch.Generator().manual_seed(seed)
    out = []
    n = args.rollout.batch_size * args.rollout.n_samples_per_prompt
    for i in range(n):
        p, r = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        seq = torch.randint(3, vocab, (p + r,), generator=g)
        action = torch.zeros(p + r, dtype=torch.long)
        action[p:] = 1
        reward = float(torch.randn(1, generator=g))
        out.append(Experience(sequences=seq[None], attention_mask=torch.ones(1, p + r, dtype=torch.long),
                              action_mask=action[1:][None], rewards=torch.tensor([reward]),
                              response_length=torch.tensor([r]), truncated=torch.tensor([False]),
                              total_length=torch.tensor([float(p + r)]), prompts=[f"p{i // 2}"], labels=[""],
                              images=[None], mm_train_inputs=[None], info={"reward": torch.tensor([reward])}))
    return out


def experience_maker(group, args, pad_token_id=0):
    """OpenRLHF's RemoteExperienceMaker with the policy group only (no critic, reference or reward model)."""
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    strategy = Strategy(args)
    return RemoteExperienceMaker(group, None, None, None, FixedKLController(0.0), strategy,
                                 SimpleNamespace(pad_token_id=pad_token_id))


def actor_trainer(model, args):
    """OpenRLHF's ActorPPOTrainer (its own __init__: PolicyLoss from the args) on the stand-in strategy."""
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer
    scheduler = SimpleNamespace(get_last_lr=lambda: [0.0])
    return ActorPPOTrainer(Strategy(args), openrlhf_actor(model, args), None, None, scheduler,
                           micro_train_batch_size=2)


def run_step(model, packed=False):
    """make_experience_batch, then training_step on each experience: the advantages and, per
    experience, the gradients of the first parameters. Plain lists (JSON)."""
    args = cli_args(argv(packed))
    experiences = experience_maker(policy_group(model, args), args).make_experience_batch(rollouts(args))
    trainer = actor_trainer(model, args)
    grads = []
    for e in experiences:
        model.zero_grad()
        trainer.training_step(e, kl_ctl=0.0, step=0, loss_batch_info={})
        grads.append([p.grad.flatten()[:64].tolist() for p in list(model.parameters())[:3]])
    return {"advantages": [e.advantages.tolist() for e in experiences],
            "old_log_probs": [e.action_log_probs.tolist() for e in experiences], "grads": grads}
