"""DelTA inside verl's PPO trainer, switched on by config, without forking verl.

Enable::

    python -m verl.trainer.main_ppo ... trainer.v1.trainer_mode=delta_sync \\
        +algorithm.delta.enable=True +algorithm.delta.k=1 +algorithm.delta.sketch_dim=256

This module must be imported in every process (the driver and the Ray workers): the installed
package's ``verl.plugins`` entry point does it (see Registration below).

Data flow (targets verl 0.9.1, engine workers, FSDP/FSDP2 LM-head engine):

* worker, old-log-prob pass: around each micro-batch forward the decoder body's output is
  captured (``capture_hidden_states``) and turned into per-token vectors z = v @ R (or exact v when
  ``sketch_dim`` is None) laid out like verl's ``log_probs`` (jagged, one row per sequence, packed
  ``cu_seqlens`` and padded model inputs alike). verl's own micro-batch concatenation and dynamic
  batch reordering carry them back as ``delta_vectors``. No extra forward.
* driver: the old-log-prob pass also returns the vectors, laid out [B, R, D] like
  ``old_log_probs`` (verl's own ``no_padding_2_padding``) and held on the driver (``PENDING``, not
  in the batch the reference/critic passes ship); after ``compute_advantage`` the coefficients
  are computed over the whole batch (global statistics: the driver holds every rank's rows) and
  folded in:
  ``advantages <- advantages * coef * response_mask``. verl's policy losses then apply unchanged.
* memory: B x R x D values (hidden's dtype) through Ray once (workers to driver):
  with ``sketch_dim=256`` 1 GiB per 512 x 4,096 tokens in bf16, against 16 GiB exact at H = 4,096;
  released by the fold.
* why ``token_sketch`` + ``delta_coefficients`` and not ``DeltaAccumulator``: the micro-batches
  live in the worker processes and the advantages exist only on the driver, after the reference
  and critic passes; an accumulator cannot span that Ray boundary without a second worker call
  that verl has no hook for. So each worker micro-batch becomes its vectors at once (z, or v),
  and the driver, which then holds the whole batch in one tensor, makes one
  ``delta_coefficients`` call: what the accumulator would compute, without its chunking.
* metrics: ``delta/coef_std``, ``delta/coef_min``, ``delta/coef_max``, ``delta/gamma_pos``,
  ``delta/gamma_neg``, ``delta/n_pos``, ``delta/n_neg`` join the fit loop's metrics dict (and so
  every configured logger) through its ``compute_data_metrics`` call.

Registration: ``pip install delta-kernels`` declares the ``verl.plugins`` entry point that
``import verl`` loads (VERL_USE_EXTERNAL_PLUGINS=auto, verl's default); without the installed
metadata (a source checkout), or with entry points disabled, set
``VERL_USE_EXTERNAL_MODULES=delta_kernels.integrations.verl`` (which also fails loudly where an
entry point that fails to load is only logged at debug level). Monkeypatches (verl leaves no
hook for extra worker outputs, a post-advantage step or extra metrics), verl 0.9.1:
    1. ``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.forward_step`` (worker)
    2. ``verl.trainer.ppo.ray_trainer.RayPPOTrainer._compute_old_log_prob`` (driver)
    3. ``verl.trainer.ppo.ray_trainer.compute_advantage`` (driver; the module global the fit loop calls)
    4. ``verl.trainer.ppo.ray_trainer.compute_data_metrics`` (driver; adds the delta/* metrics)
    5. ``verl.utils.config.validate_config`` (driver; main_ppo's config check): with
       ``algorithm.delta.enable`` and ``trainer.use_v1`` (verl's default), refuses a
       ``trainer.v1.trainer_mode`` other than ``delta_sync``
    6. ``ppo_loss`` in ``verl.workers.utils.losses``, ``verl.workers.engine_workers`` and
       ``verl.trainer.distillation.losses`` (worker): hands the actor's entropies to the policy
       loss of the same call (verl_credit.py; read only by the ``delta_entropy`` losses)
Each wrapper calls the original and does nothing unless ``algorithm.delta.enable`` is set
(3: nor inside ``legacy_fold_inert``; 4: unless the batch carries them; 6: only passes the entropies on).

Trainers: the legacy ``RayPPOTrainer`` (``trainer.use_v1=False``) through patches 2-4; verl
0.9.1's default v1 trainer (verl/trainer/ppo/v1, TransferQueue) through
``DeltaPPOTrainerSync``, registered as ``"delta_sync"`` by ``delta_kernels.integrations.verl_v1``
(imported by ``install``; where verl's v1 package cannot be imported, ``V1_SKIPPED`` says why).
Config ``algorithm.delta``: enable, k, lam_min, lam_max, eps, sketch_dim, seed, backend, and vectors=head with
vocab_sketch_dim (DelTA on the LM-head gradient's factors: the workers send [u | s], r1 + r2 per token, from
head_gradient_sketch on the captured states, the head's weight and the rolled input ids; ``core.fold`` splits it).

Credit methods (delta_kernels.credit), a config key each (verl_credit.py has their options):

    +algorithm.delta.enable=True                                    # DelTA (above), before the update
    actor_rollout_ref.actor.policy_loss.loss_mode=delta_fipo        # FIPO, in the loss
    actor_rollout_ref.actor.policy_loss.loss_mode=delta_entropy actor_rollout_ref.actor.calculate_entropy=True
                                                                    # high-entropy tokens (80/20), in the loss
    actor_rollout_ref.actor.policy_loss.loss_mode=delta_fipo_entropy actor_rollout_ref.actor.calculate_entropy=True

DelTA composes with each loss mode (its coefficients are already in the advantages).
"""
from __future__ import annotations

import contextvars
import importlib
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch

from .._optional import require
from ..coefficients import DeltaResult
from ..sketch import token_sketch
from . import core
from .capture import capture_hidden_states, lm_head_parameters
from .core import DeltaSpec

require("verl", "verl")

SPEC_KEY = "delta_token_vectors"   # non-tensor field of the worker batch: the DeltaSpec kwargs + temperature
VECTORS_KEY = "delta_vectors"      # per-token vectors in the workers' output
METRICS_KEY = "delta_metrics"      # meta_info of the driver's batch: {"delta/...": float}
VERL_VERSION = "0.9.1"


def spec_from_config(algorithm_config) -> Optional[DeltaSpec]:
    """``algorithm.delta`` -> DeltaSpec, or None when absent or not enabled."""
    cfg = algorithm_config.get("delta", None) if algorithm_config is not None else None
    if cfg is None:
        return None
    cfg = dict(cfg)
    if not cfg.pop("enable", False):
        return None
    spec = DeltaSpec.parse(cfg)
    if spec is not None and spec.vectors == "head" and spec.vocab_sketch_dim is None:
        raise ValueError("vocab_sketch_dim: algorithm.delta.vectors=head needs it (the workers send [u | s] in one "
                         "tensor, and exact u would be [tokens x vocab])")
    return spec


def check_temperature(sampling: float, logprob: float) -> None:
    """The log-probs DelTA weighs must be those of the sampling distribution."""
    if float(sampling) != float(logprob):
        raise ValueError(f"temperature: log-probs are computed at temperature {logprob} but responses were sampled "
                         f"at {sampling}; set actor_rollout_ref.rollout.temperature and the log-prob temperature "
                         "(batch.meta_info['temperature']) to the same value")


# ---------------------------------------------------------------- worker side
def packed_token_vectors(hidden: torch.Tensor, log_probs: torch.Tensor, cu_seqlens: torch.Tensor,
                         spec: DeltaSpec, packed: bool, head_inputs=None) -> torch.Tensor:
    """Per-token vectors in verl's jagged log-prob layout.

    hidden: the body output of one micro-batch: [1, nnz (+ pad), H] when ``packed``
        (use_remove_padding) or [b, S_max, H] (right-padded per sequence) otherwise.
    log_probs: jagged [b, j1] (log_probs[i, j] is the log-prob of token j + 1 given positions
        <= j, the hidden state at j predicts it). cu_seqlens: [b + 1] offsets of the sequences.
    head_inputs: with spec.vectors "head", (weight [V, H], bias or None, input ids jagged values [nnz],
        temperature): the target of position j is token j + 1, the ids rolled by one as verl's log-probs are.
    Returns a jagged [b, j1, D] tensor: v = (1 - exp(logp)) h, or z = v @ R with ``spec.sketch_dim``, or
    [u | s] (D = r1 + r2) with head vectors.
    """
    lengths = cu_seqlens.diff()
    nnz = int(cu_seqlens[-1])
    if packed:
        if hidden.shape[0] != 1 or hidden.shape[1] < nnz:
            raise ValueError(f"hidden: packed body output of shape {list(hidden.shape)} does not hold the {nnz} "
                             "tokens of the micro-batch (Ulysses sequence parallelism is not supported: set "
                             "ulysses_sequence_parallel_size=1)")
        flat = hidden[0, :nnz]
    else:
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None].to(hidden.device)
        flat = hidden[keep]
    logp = log_probs.values() if log_probs.is_nested else log_probs.reshape(-1)
    if spec.vectors == "head":
        weight, bias, ids, temperature = head_inputs
        targets = torch.roll(ids.to(flat.device), -1)
        vectors = torch.cat(spec.head_factors(flat, weight.to(flat.device), bias, targets, temperature), dim=-1)
    else:
        vectors = token_sketch(flat, logp.to(flat.device).clamp_max(0), sketch_dim=spec.sketch_dim, seed=spec.seed,
                               backend=spec.backend)
    return torch.nested.nested_tensor_from_jagged(vectors, cu_seqlens.to(vectors.device))


def _forward_step_with_vectors(original):
    def forward_step(self, micro_batch, loss_function, forward_only):
        from verl.utils import tensordict_utils as tu
        spec = tu.get_non_tensor_data(data=micro_batch, key=SPEC_KEY, default=None)
        if spec is None:
            return original(self, micro_batch, loss_function, forward_only)
        if getattr(self, "ulysses_sequence_parallel_size", 1) > 1:
            raise ValueError("ulysses_sequence_parallel_size > 1: each rank holds a slice of the hidden states; "
                             "DelTA's capture needs ulysses_sequence_parallel_size=1 in the actor's engine config")
        spec = dict(spec)
        sampling_temperature = spec.pop("temperature")
        temperature = micro_batch["temperature"]
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.reshape(-1)[0].item()
        check_temperature(sampling_temperature, temperature)
        with capture_hidden_states(self.module) as cap:
            loss, output = original(self, micro_batch, loss_function, forward_only)
        packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
        cu_seqlens = micro_batch["input_ids"].offsets()
        model_output = output["model_output"]
        spec = DeltaSpec(**spec)
        head_inputs = None
        if spec.vectors == "head":
            head_inputs = (*lm_head_parameters(self.module), micro_batch["input_ids"].values(), temperature)
        model_output[VECTORS_KEY] = packed_token_vectors(cap.pop(), model_output["log_probs"], cu_seqlens,
                                                         spec, packed, head_inputs).detach()
        return loss, output
    forward_step.__wrapped__ = original
    forward_step._delta_kernels_patch = True
    return forward_step


# ---------------------------------------------------------------- driver side
class PendingVectors:
    """The driver's vectors between the old-log-prob pass and ``compute_advantage``, kept out of
    the batch so that the reference and critic passes in between do not ship them to workers."""

    def __init__(self):
        self._vectors = self._responses = None

    def put(self, vectors: torch.Tensor, responses: torch.Tensor) -> None:
        self._vectors, self._responses = vectors, responses

    def take(self, responses: torch.Tensor) -> Optional[torch.Tensor]:
        """The vectors of the batch whose ``responses`` these are (None when none are pending)."""
        vectors, held = self._vectors, self._responses
        self._vectors = self._responses = None
        if vectors is not None and (held.shape != responses.shape or not torch.equal(held, responses)):
            raise ValueError("responses: the batch changed (rows reordered or filtered) between the old-log-prob "
                             "pass and compute_advantage; DelTA's vectors no longer line up with it")
        return vectors


PENDING = PendingVectors()


def _compute_old_log_prob_with_vectors(original):
    def _compute_old_log_prob(self, batch):
        spec = spec_from_config(self.config.algorithm)
        if spec is None:
            return original(self, batch)
        from verl.workers.utils.padding import no_padding_2_padding
        from verl.utils import tensordict_utils as tu
        sampling = self.config.actor_rollout_ref.rollout.temperature
        check_temperature(sampling, batch.meta_info.get("temperature", sampling))
        wg = self.actor_rollout_wg
        call = wg.compute_log_prob
        got: List = []

        def compute_log_prob(data):
            tu.assign_non_tensor(data, **{SPEC_KEY: dict(spec.kwargs(), temperature=float(sampling))})
            out = call(data)
            got.append(tu.get(out, VECTORS_KEY))
            return out
        wg.compute_log_prob = compute_log_prob  # verl binds worker methods as instance attributes: restore it
        try:
            result, mfu = original(self, batch)
        finally:
            wg.compute_log_prob = call
        if not got or got[0] is None:
            raise RuntimeError(_MISSING)
        PENDING.put(no_padding_2_padding(got[0], batch.batch), batch.batch["responses"])
        return result, mfu
    _compute_old_log_prob.__wrapped__ = original
    _compute_old_log_prob._delta_kernels_patch = True
    return _compute_old_log_prob


_MISSING = ("algorithm.delta.enable=True but the workers returned no delta_vectors: the worker-side capture is not "
            "installed. Install delta-kernels in the workers' environment (its verl.plugins entry point loads the "
            "capture) or set VERL_USE_EXTERNAL_MODULES=delta_kernels.integrations.verl there "
            "(ray_kwargs.ray_init.runtime_env.env_vars), use the FSDP engine, and recompute old log-probs "
            "(no rollout_correction bypass_mode)")


def fold_delta_into_advantages(data, algorithm_config, vectors: Optional[torch.Tensor]) -> Optional[DeltaResult]:
    """After ``compute_advantage``: ``advantages <- advantages * coef * response_mask`` in place.

    data: verl DataProto with ``advantages``, ``old_log_probs``, ``response_mask`` [B, R].
    vectors: [B, R, D] from the workers' old-log-prob pass (z, or exact v), aligned with
    ``old_log_probs``. Writes ``data.meta_info[METRICS_KEY]``. Returns the DeltaResult
    (None when DelTA is off).
    """
    spec = spec_from_config(algorithm_config)
    if spec is None:
        return None
    if vectors is None:
        raise ValueError(_MISSING)
    folded = core.fold(spec, data.batch["advantages"], data.batch["old_log_probs"], data.batch["response_mask"],
                       vectors=vectors)
    data.batch["advantages"] = folded.advantages
    data.meta_info[METRICS_KEY] = folded.metrics
    return folded.result


def _data_metrics_with_delta(original):
    def compute_data_metrics(batch, *args, **kwargs):
        metrics = original(batch, *args, **kwargs)
        metrics.update(batch.meta_info.get(METRICS_KEY, {}))
        return metrics
    compute_data_metrics.__wrapped__ = original
    compute_data_metrics._delta_kernels_patch = True
    return compute_data_metrics


def _validate_config_checking_trainer(original):
    def validate_config(config, *args, **kwargs):
        result = original(config, *args, **kwargs)
        check_trainer(config)
        return result
    validate_config.__wrapped__ = original
    validate_config._delta_kernels_patch = True
    return validate_config


DELTA_TRAINERS = ("delta_sync",)  # trainer.v1.trainer_mode names registered by delta_kernels.integrations.verl_v1


def check_trainer(config) -> None:
    """With ``algorithm.delta.enable`` and verl's v1 trainer (``trainer.use_v1``, verl's default),
    refuse a ``trainer.v1.trainer_mode`` that is not a DelTA trainer: DelTA would silently be off."""
    if spec_from_config(config.get("algorithm", None)) is None:
        return
    trainer = config.get("trainer", {})
    if not trainer.get("use_v1", False):
        return
    mode = (trainer.get("v1", None) or {}).get("trainer_mode", None)
    if mode in DELTA_TRAINERS and V1_SKIPPED is None:
        return
    why = (f"verl's v1 trainer could not be imported here ({V1_SKIPPED}), so no DelTA trainer is registered"
           if V1_SKIPPED is not None else f"{mode!r} is not a DelTA trainer")
    raise ValueError(f"trainer.v1.trainer_mode: {why}; algorithm.delta.enable=True needs "
                     "trainer.v1.trainer_mode=delta_sync (or trainer.use_v1=False for the legacy trainer)")


_IN_V1 = contextvars.ContextVar("delta_kernels_verl_v1_advantage", default=False)


@contextmanager
def legacy_fold_inert():
    """verl's v1 trainer calls ray_trainer.compute_advantage (imported by name after patch 3):
    inside this block that patch only calls the original; the v1 trainer folds by itself."""
    token = _IN_V1.set(True)
    try:
        yield
    finally:
        _IN_V1.reset(token)


def _compute_advantage_then_fold(original):
    def compute_advantage(data, *args, config=None, **kwargs):
        data = original(data, *args, config=config, **kwargs)
        if spec_from_config(config) is not None and not _IN_V1.get():
            fold_delta_into_advantages(data, config, PENDING.take(data.batch["responses"]))
        return data
    compute_advantage.__wrapped__ = original
    compute_advantage._delta_kernels_patch = True
    return compute_advantage


# ---------------------------------------------------------------- registration
def install() -> Dict[str, str]:
    """Apply the patches listed in the module docstring (idempotent). Returns {target: status};
    the driver patches are skipped where verl's trainer cannot be imported (a worker-only process)."""
    import verl
    if getattr(verl, "__version__", VERL_VERSION) != VERL_VERSION:
        raise ImportError(f"delta_kernels.integrations.verl targets verl {VERL_VERSION}, found {verl.__version__}")
    status = {}
    ti = require("verl.workers.engine.fsdp.transformer_impl", "verl")
    status["FSDPEngineWithLMHead.forward_step"] = _patch(ti.FSDPEngineWithLMHead, "forward_step",
                                                         _forward_step_with_vectors)
    config_utils = require("verl.utils.config", "verl")
    status["utils.config.validate_config"] = _patch(config_utils, "validate_config", _validate_config_checking_trainer)
    status.update(_patch_ppo_loss())
    try:
        rt = require("verl.trainer.ppo.ray_trainer", "verl")
    except ImportError as e:
        status["ray_trainer"] = f"skipped: {e}"
        return status
    status["RayPPOTrainer._compute_old_log_prob"] = _patch(rt.RayPPOTrainer, "_compute_old_log_prob",
                                                           _compute_old_log_prob_with_vectors)
    status["ray_trainer.compute_advantage"] = _patch(rt, "compute_advantage", _compute_advantage_then_fold)
    status["ray_trainer.compute_data_metrics"] = _patch(rt, "compute_data_metrics", _data_metrics_with_delta)
    global V1_SKIPPED
    try:  # registers "delta_sync"; after the patches above (v1's utils import compute_advantage by name)
        importlib.import_module(".verl_v1", __package__)
        status["v1.delta_sync"] = "registered"
    except ImportError as e:
        V1_SKIPPED = f"{type(e).__name__}: {e}"
        status["v1.delta_sync"] = f"skipped: {V1_SKIPPED}"
    return status


def _patch_ppo_loss() -> Dict[str, str]:
    """Patch 6: ``ppo_loss`` where verl's workers (and its distillation loss) look it up by name."""
    from .verl_credit import ppo_loss_passing_entropy
    status = {}
    for name in ("verl.workers.utils.losses", "verl.workers.engine_workers", "verl.trainer.distillation.losses"):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            status[f"{name}.ppo_loss"] = f"skipped: {e}"
            continue
        status[f"{name}.ppo_loss"] = _patch(module, "ppo_loss", ppo_loss_passing_entropy)
    return status


def _patch(owner, name, wrap) -> str:
    current = getattr(owner, name)
    if getattr(current, "_delta_kernels_patch", False):
        return "already patched"
    setattr(owner, name, wrap(current))
    return "patched"


V1_SKIPPED: Optional[str] = None  # why verl's v1 trainer could not be imported (then "delta_sync" is not registered)
INSTALLED = install()

from . import verl_credit  # noqa: E402,F401  (registers the delta_fipo / delta_entropy policy losses)
