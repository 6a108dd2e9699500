"""DelTA in verl 0.9.1's v1 trainer (``trainer.use_v1: true``, verl's default), on TransferQueue.

Enable (``trainer.use_v1`` stays true)::

    python -m verl.trainer.main_ppo ... +algorithm.delta.enable=true trainer.v1.trainer_mode=delta_sync

``delta_kernels.integrations.verl`` imports this module (it is loaded by verl's plugin entry
point, see there) and so registers ``DeltaPPOTrainerSync`` as ``"delta_sync"``; where verl's
v1 package cannot be imported the registration is skipped and ``verl.V1_SKIPPED`` says why.

Data flow, per step (``PPOTrainer._step_once``: balance, old log-probs, ref, values, advantages,
update):

* ``_compute_old_log_prob``: the DelTA options and the rollout temperature go into
  ``batch.extra_info``, which verl's ``tqbridge`` hands to the workers with the batch; the
  worker patch on ``FSDPEngineWithLMHead.forward_step`` emits ``delta_vectors`` with the
  log-probs (no extra forward), and ``tqbridge`` writes every output tensor into TransferQueue.
  The options leave ``extra_info`` again and ``delta_vectors`` leaves the returned
  ``KVBatchMeta.fields`` (the list the workers fetch), so neither the reference pass nor the
  update fetches or computes vectors.
* ``_compute_advantage``: verl's own (the legacy fold inert: v1's utils call the patched
  ``ray_trainer.compute_advantage``), then advantages, old log-probs, response mask and vectors
  are read back from TransferQueue, the vectors response-aligned as verl aligns log-probs
  (``response_from_nested``), ``is_padding`` samples masked out, one ``delta_coefficients``
  over the batch (global statistics: the driver holds every sample), and
  ``advantages * coef * mask`` written back; ``ppo_loss`` reads ``advantages`` unchanged.
  The seven ``delta/*`` metrics join the step's metrics.

Refused: ``algorithm.rollout_correction.bypass_mode`` (no old-log-prob pass, so no hidden
states); workers that returned no vectors (error naming delta_kernels). verl's asynchronous v1
trainers (``PPOTrainerColocateAsync``, ``PPOTrainerSeparateAsync``) are not covered yet.
"""
from __future__ import annotations

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_from_nested, response_to_nested

from . import core
from .verl import _MISSING, SPEC_KEY, VECTORS_KEY, legacy_fold_inert, spec_from_config


def _without_vectors(meta):
    """``meta`` with ``delta_vectors`` dropped from the fields the workers fetch."""
    if meta.fields is not None:
        meta.fields = [f for f in meta.fields if f != VECTORS_KEY]
    return meta


class DeltaV1Mixin:
    """The DelTA steps of a v1 ``PPOTrainer``: put before the trainer class in the bases."""

    def _compute_old_log_prob(self, batch, metrics):
        spec = spec_from_config(self.config.algorithm)
        if spec is None:
            return super()._compute_old_log_prob(batch, metrics)
        correction = self.config.algorithm.get("rollout_correction", None)
        if correction and correction.get("bypass_mode", False):
            raise ValueError("algorithm.rollout_correction.bypass_mode: DelTA needs the hidden states of the old-log-"
                             "prob pass, which bypass mode skips; set bypass_mode=false with algorithm.delta.enable")
        temperature = float(self.config.actor_rollout_ref.rollout.temperature)
        batch.extra_info[SPEC_KEY] = dict(spec.kwargs(), temperature=temperature)
        try:
            out = super()._compute_old_log_prob(batch, metrics)
        finally:
            batch.extra_info.pop(SPEC_KEY, None)
        if out.extra_info:
            out.extra_info.pop(SPEC_KEY, None)
        if VECTORS_KEY not in (out.fields or []):
            raise RuntimeError(_MISSING)
        return _without_vectors(out)

    def _compute_advantage(self, batch, metrics):
        spec = spec_from_config(self.config.algorithm)
        if spec is None:
            return super()._compute_advantage(batch, metrics)
        with legacy_fold_inert():
            batch = super()._compute_advantage(batch, metrics)
        fields = ["advantages", "old_log_probs", "response_mask", VECTORS_KEY]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        if VECTORS_KEY not in data.keys():
            raise RuntimeError(_MISSING)
        nested_mask = data["response_mask"]
        data[VECTORS_KEY] = response_from_nested(data[VECTORS_KEY], nested_mask)  # aligned like old_log_probs
        padded = data.to_padded_tensor()
        real = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags], dtype=torch.bool)
        mask = padded["response_mask"].bool() & real[:, None].to(padded["response_mask"].device)
        folded = core.fold(spec, padded["advantages"], padded["old_log_probs"], mask, vectors=padded[VECTORS_KEY])
        metrics.update(folded.metrics)
        out = TensorDict({"advantages": response_to_nested(folded.advantages, nested_mask)}, batch_size=len(batch))
        return _without_vectors(tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=out))


@register_trainer("delta_sync")
class DeltaPPOTrainerSync(DeltaV1Mixin, PPOTrainerSync):
    """verl's ``PPOTrainerSync`` with DelTA (``algorithm.delta.enable``); plain ``PPOTrainerSync`` when off."""
