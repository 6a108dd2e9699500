"""Stand-ins for what of verl cannot run on this CPU machine, and nothing else: the FSDP/device
set-up of its engine, the peak-flops query, and the TransferQueue service (an in-memory store
with TransferQueue's kv API). verl's own engine, TrainingWorker, worker method and v1 trainer
methods run on them. This module imports no delta_kernels (the "off" runs use it in a process
that never loads the plugin)."""
from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import Dict, List

import torch
from omegaconf import OmegaConf
from tensordict import TensorDict
from tensordict.tensorclass import NonTensorData, NonTensorStack
from verl.utils import tensordict_utils as tu
import verl.utils.torch_functional as verl_F
from verl.workers.engine.fsdp import transformer_impl as ti


def cpu_engine(model):
    """verl's FSDPEngineWithLMHead around an unwrapped model: its own forward_backward_batch,
    micro-batching (dynamic batch size, reordering), prepare_model_inputs/outputs and
    forward_step; only the FSDP/device set-up is left out."""
    eng = object.__new__(ti.FSDPEngineWithLMHead)
    eng.module = model.eval()
    eng.pad_to_length, eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size = False, False, 1
    eng.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    eng.compute_entropy_from_logits = verl_F.entropy_from_logits
    eng._autocast_dtype = torch.float32
    eng.get_data_parallel_group, eng.get_data_parallel_size = (lambda: None), (lambda: 1)
    return eng


class FlopsEstimate:
    """verl's FlopsCounter asks CUDA for the device's peak flops."""

    def estimate_flops(self, global_token_num, delta_time, images_seqlens=None):
        return float(sum(global_token_num)), 1e3


def training_worker(model, use_remove_padding=False, max_tokens=16):
    """verl's TrainingWorker (the actor's infer_batch and _postprocess_output) around the CPU engine."""
    from verl.workers.engine_workers import TrainingWorker
    eng = cpu_engine(model)
    eng.eval_mode = lambda **kw: nullcontext()  # FSDP's eval context: offload and resharding only
    eng.ulysses_device_mesh = None
    worker = object.__new__(TrainingWorker)
    worker.engine, worker.loss_fn, worker.device_name, worker.flops_counter = eng, None, "cpu", FlopsEstimate()
    worker.model_config = OmegaConf.create(dict(use_remove_padding=use_remove_padding))
    worker.engine_config = SimpleNamespace(use_dynamic_bsz=True, infer_max_token_len_per_gpu=max_tokens,
                                           infer_micro_batch_size_per_gpu=None, use_fused_kernels=False)
    return worker


class MemoryTQ:
    """TransferQueue's kv API (kv_batch_put / kv_batch_get) over a dict {key: {field: tensor}}:
    what a TransferQueue storage unit holds, per sample, in process."""

    def __init__(self):
        self.samples: Dict[str, dict] = {}
        self.tags: Dict[str, dict] = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from transfer_queue import KVBatchMeta
        if fields is not None:
            for i, key in enumerate(keys):
                row = self.samples.setdefault(key, {})
                for name in fields.keys():
                    value = fields[name]
                    row[name] = value.tolist()[i] if isinstance(value, NonTensorStack) else value[i]
        for key, tag in zip(keys, tags or [None] * len(keys)):
            if tag is not None:
                self.tags[key] = dict(tag)
        names = sorted(set.intersection(*(set(self.samples.get(k, {})) for k in keys)))
        return KVBatchMeta(keys=list(keys), tags=[self.tags.get(k, {}) for k in keys], partition_id=partition_id,
                           fields=names)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict
        rows = [self.samples[k] for k in keys]
        names = list(rows[0]) if select_fields is None else [f for f in select_fields if f in rows[0]]
        return list_of_dict_to_tensordict([{n: r[n] for n in names} for r in rows])


def worker_batch(store: MemoryTQ, meta: KVBatchMeta) -> TensorDict:
    """What verl's tqbridge hands a worker method: the meta's fields (all when None) plus its
    extra_info as non-tensor data (verl.utils.transferqueue_utils._async_meta_to_realdata)."""
    data = store.kv_batch_get(meta.keys, meta.partition_id, meta.fields)
    for key, val in dict(meta.extra_info or {}).items():
        if isinstance(val, (NonTensorData, NonTensorStack)):
            data[key] = val
        else:
            tu.assign_non_tensor_data(tensor_dict=data, key=key, val=val)
    return data


class WorkerGroup:
    """The actor worker group as v1's driver sees it, with tqbridge's round trip: each call
    fetches ``meta.fields`` from the store, runs verl's worker method on verl's TrainingWorker,
    writes every output tensor back and returns the KVBatchMeta with all stored fields.
    ``fetched`` and ``written`` record the field names of each call."""

    def __init__(self, store: MemoryTQ, model, use_remove_padding=False):
        from verl.workers.engine_workers import ActorRolloutRefWorker
        self.store, self.method = store, ActorRolloutRefWorker.compute_log_prob
        self.actor = training_worker(model, use_remove_padding, max_tokens=256)
        self.fetched: List[List[str]] = []
        self.written: List[List[str]] = []

    def compute_log_prob(self, meta):
        data = worker_batch(self.store, meta)
        self.fetched.append(sorted(k for k in data.keys() if isinstance(data[k], torch.Tensor)))
        out = self.method(SimpleNamespace(actor=self.actor, enable_routing_replay=False), data)
        tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        self.written.append(sorted(tensors))
        put = self.store.kv_batch_put(meta.keys, meta.partition_id, fields=out.select(*tensors))
        put.extra_info = dict(meta.extra_info or {})
        return put

    compute_ref_log_prob = compute_log_prob  # the reference worker's method: verl's same infer_batch

    def update_actor(self, meta):
        """The update pass's fetch only (verl's optimizer step needs FSDP): records the fields."""
        data = worker_batch(self.store, meta)
        self.fetched.append(sorted(k for k in data.keys() if isinstance(data[k], torch.Tensor)))
        return {"metrics": {"mfu": 0.0}}


def samples(td, uids, scores):
    """verl's v1 agent-loop records (AgentLoopWorkerTQ._agent_loop_postprocess) of a padded
    rollout batch td (left-padded prompts, right-padded responses): per key, unpadded prompts,
    responses, input_ids, position_ids, response_mask, loss_mask, uid, and rm_scores (the score
    on the last response token). Returns (keys, fields, tags)."""
    keys, fields, tags = [], [], []
    p_mask = td["attention_mask"][:, :td["prompts"].shape[1]].bool()
    r_mask = td["response_mask"].bool()
    for i, uid in enumerate(uids):
        prompts, responses = td["prompts"][i][p_mask[i]], td["responses"][i][r_mask[i]]
        rm = torch.zeros(len(responses))
        rm[-1] = float(scores[i])
        ids = torch.cat([prompts, responses])
        keys.append(f"{uid}_{i}_0")
        fields.append(dict(prompts=prompts, responses=responses, input_ids=ids, position_ids=torch.arange(len(ids)),
                           attention_mask=torch.ones_like(ids), response_mask=torch.ones_like(responses),
                           loss_mask=torch.ones_like(responses), rm_scores=rm, uid=uid))
        tags.append(dict(status="success", prompt_len=len(prompts), response_len=len(responses), seq_len=len(ids),
                         global_steps=0))
    return keys, fields, tags


B, P, R = 5, 5, 6
UIDS = ["a", "a", "b", "b", "b"]
EOS = 2


def padded_batch(seed=0):
    """verl's rollout output: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = torch.randint(3, 17, (B, P), generator=g), torch.randint(3, 17, (B, R), generator=g)
    p_len, r_len = torch.tensor([5, 3, 4, 2, 5]), torch.tensor([6, 2, 5, 6, 1])
    p_mask = torch.arange(P)[None] >= P - p_len[:, None]
    r_mask = torch.arange(R)[None] < r_len[:, None]
    prompts[~p_mask], responses[~r_mask] = 0, 0
    attn = torch.cat([p_mask, r_mask], 1).long()
    return TensorDict(dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
                           attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp_min(0),
                           response_mask=r_mask.long()), batch_size=[B])


def scores():
    return torch.randn(len(UIDS), generator=torch.Generator().manual_seed(7))


def use_store(store: MemoryTQ, setattr_=setattr) -> None:
    """Route transfer_queue's kv calls (verl's trainer, its padding helper, the plugin) to ``store``."""
    import transfer_queue
    setattr_(transfer_queue, "kv_batch_get", store.kv_batch_get)
    setattr_(transfer_queue, "kv_batch_put", store.kv_batch_put)


def trainer_on(store, model, packed, **config):
    """A v1 trainer (verl's registry picks the class from trainer.v1.trainer_mode) with its
    config and worker group; __init__ (Ray resource pools, rollout servers) is skipped."""
    from verl.trainer.ppo.v1 import get_trainer_cls
    cfg = v1_config(**{"algorithm.adv_estimator": "grpo", "actor_rollout_ref.rollout.calculate_log_probs": "false",
                       "actor_rollout_ref.rollout.n": 1, "actor_rollout_ref.actor.use_dynamic_bsz": "true", **config})
    trainer = object.__new__(get_trainer_cls(cfg.trainer.v1.trainer_mode))
    trainer.config = cfg
    trainer.actor_rollout_wg = WorkerGroup(store, model, use_remove_padding=packed)
    trainer.ref_policy_wg = WorkerGroup(store, model, use_remove_padding=packed)
    trainer.ref_in_actor, trainer.use_critic, trainer.global_steps = False, False, 0
    return trainer


def step(trainer, store, td, n_pad=1):
    """Rollout records in the store, verl's padding to a batch multiple (n_pad is_padding
    samples), then the step's methods in PPOTrainer._step_once's order. Returns (meta, metrics)."""
    from verl.trainer.ppo import padding_utils
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict
    keys, fields, tags = samples(td, UIDS, scores())
    meta = store.kv_batch_put(keys, "train", fields=list_of_dict_to_tensordict(fields), tags=tags)
    meta.extra_info = {}
    meta = padding_utils.upsample_batch_to_divisible_size(meta, len(UIDS) + n_pad, EOS)
    meta.extra_info["temperature"] = trainer.config.actor_rollout_ref.rollout.temperature
    metrics = {}
    meta = trainer._compute_old_log_prob(meta, metrics)
    meta = trainer._compute_ref_log_prob(meta, metrics)
    meta = trainer._compute_advantage(meta, metrics)
    trainer._update_actor(meta, metrics)
    return meta, metrics


def padded(store, keys, name):
    return store.kv_batch_get(keys, "train", [name]).to_padded_tensor()[name]


def plain_run(model, **config) -> dict:
    """``step`` with verl's own trainer for trainer.v1.trainer_mode (default "sync"): the
    stored advantages and old log-probs, and the fields each worker call fetched."""
    store = MemoryTQ()
    use_store(store)
    trainer = trainer_on(store, model, False, **config)
    meta, _ = step(trainer, store, padded_batch(2))
    out = {name: padded(store, meta.keys, name).tolist() for name in ("advantages", "old_log_probs")}
    out["fetched"] = trainer.actor_rollout_wg.fetched + trainer.ref_policy_wg.fetched
    return out


def v1_config(**overrides):
    """verl's own hydra config (ppo_trainer.yaml), composed with ``overrides`` (key=value strings)."""
    from hydra import compose, initialize_config_module
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=[f"{k}={v}" for k, v in overrides.items()])
