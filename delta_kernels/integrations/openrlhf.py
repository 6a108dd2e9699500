"""DelTA inside OpenRLHF 0.11.2's PPO (``train_ppo_ray``), without forking it. One of::

    python -m delta_kernels.integrations.openrlhf --delta.k 1 [--delta.sketch_dim 256 ...] <train_ppo_ray args>

    from delta_kernels.integrations.openrlhf import enable_delta
    enable_delta(k=1, sketch_dim=256)          # before OpenRLHF's train(args); Ray not started yet

    ray.init(runtime_env=delta_runtime_env(k=1, sketch_dim=256))   # Ray started by your own code

Options (``--delta.<name>``, keywords): those of ``DeltaSpec`` (k, lam_min, lam_max, eps,
sketch_dim, seed, backend).

Data flow (no extra forward; ``PolicyLoss`` unchanged):

* policy actor, old-log-prob pass (``PolicyModelActor.forward``, one call per micro rollout
  batch): the decoder body's output is captured; packed inputs (``--ds.packing_samples``:
  ``[1, nnz, H]``) are scattered back through the attention mask; the hidden state at position
  j predicts token j + 1, so the vectors ([B, A, D], v or z = v @ R) are aligned with the action
  log-probs (width A, the last A of the S - 1 next-token positions). They stay in the actor's
  process until the driver takes them through ``__ray_call__``: ``forward``'s return value, the
  experiences, the reference pass and the update never carry them.
* ``RemoteExperienceMaker.compute_advantages_and_returns`` (in the PPO trainer's process): after
  OpenRLHF's advantages, one ``DeltaAccumulator`` over all of the step's experiences (global
  statistics), then ``experience.advantages *= coef`` (0 on masked tokens).
* the rollout stats (``_compute_rollout_stats``) get ``delta/{coef_std, coef_min, coef_max,
  gamma_pos, gamma_neg, n_pos, n_neg}``.

Ray: ``PolicyModelActor`` and ``PPOTrainer`` are Ray actors. Ray instantiates
``<cls>.__ray_metadata__.modified_class``, whose methods wrap the functions of decoration time,
and ships that class from the driver to the workers; so the driver patches the modified classes
before the actors are created (``enable_delta``, ``delta_runtime_env``). Plain classes
(``RemoteExperienceMaker``) are patched in each worker by ``setup_worker``, Ray's
``worker_process_setup_hook``, which ``enable_delta`` adds to OpenRLHF's ``ray.init`` and
``delta_runtime_env`` returns; the options reach the workers in ``env_vars``.

Not supported (refused): ``--ds.ring_attn_size`` > 1 (each rank holds a slice of the sequence).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from dataclasses import fields
from importlib import metadata
from typing import Dict, List, Optional

import torch

from .._optional import require
from ..sketch import token_sketch
from . import core
from .capture import capture_hidden_states
from .core import DeltaSpec

require("openrlhf", "openrlhf")
ray = require("ray", "openrlhf")

ENV = "DELTA_KERNELS_OPENRLHF"      # the options (JSON) in every worker's environment
HOOK = __name__ + ".setup_worker"
OPENRLHF_VERSION = "0.11.2"
_STASH = "_delta_kernels_vectors"   # the policy actor's attribute holding the vectors of its forwards

_SPEC: Optional[DeltaSpec] = None
_PATCHED: List[tuple] = []          # (owner, name, original) for disable_delta
_LAST_METRICS: Dict[str, float] = {}


def delta_spec() -> Optional[DeltaSpec]:
    """The options in force in this process (None: DelTA off); in a worker, those of ``ENV``."""
    return _SPEC


def delta_runtime_env(**options) -> dict:
    """``runtime_env`` entries for ``ray.init`` that switch DelTA on in every worker:
    ``worker_process_setup_hook`` (``setup_worker``) and the options in ``env_vars``. Also
    patches this (the driver's) process, where OpenRLHF creates its actors. ``k=None``: the
    patches are installed but inert (DelTA off)."""
    spec = DeltaSpec.parse(dict(options))
    if spec is not None and spec.vectors == "head":
        raise ValueError("vectors: 'head' is not supported by the OpenRLHF adapter yet (its actors return no LM-head "
                         "factors); use vectors='hidden'")
    _install(spec)
    return {"worker_process_setup_hook": HOOK, "env_vars": {ENV: json.dumps(spec.kwargs() if spec else None)}}


def enable_delta(**options) -> Optional[DeltaSpec]:
    """Switch DelTA on for OpenRLHF's ``train(args)`` in this process: patches the driver and
    adds ``delta_runtime_env(**options)`` to the ``ray.init`` that OpenRLHF calls. Never starts
    Ray; refuses when Ray is already up (use ``delta_runtime_env`` there). Idempotent."""
    if ray.is_initialized():
        raise RuntimeError("enable_delta: Ray is already initialized, so its workers cannot get DelTA's setup hook; "
                           "call enable_delta before ray.init, or pass runtime_env=delta_runtime_env(...) to "
                           "ray.init yourself")
    delta_runtime_env(**options)
    _patch(ray, "init", _init_with_hook)
    return _SPEC


def disable_delta() -> None:
    """Undo ``enable_delta`` / ``delta_runtime_env`` / ``setup_worker`` in this process."""
    global _SPEC
    while _PATCHED:
        owner, name, original = _PATCHED.pop()
        setattr(owner, name, original)
    _SPEC = None
    os.environ.pop(ENV, None)


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: patch this worker with the options of ``ENV``."""
    text = os.environ.get(ENV)
    if text:
        options = json.loads(text)
        _install(DeltaSpec.parse(options) if options is not None else None)


def _install(spec: Optional[DeltaSpec]) -> None:
    found = metadata.version("openrlhf")
    if found != OPENRLHF_VERSION:
        raise ImportError(f"delta_kernels.integrations.openrlhf targets OpenRLHF {OPENRLHF_VERSION}, found {found}")
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor
    global _SPEC
    _SPEC = spec
    os.environ[ENV] = json.dumps(spec.kwargs() if spec else None)
    _patch(PolicyModelActor.__ray_metadata__.modified_class, "forward", _forward_with_vectors)
    _patch(PPOTrainer.__ray_metadata__.modified_class, "_compute_rollout_stats", _rollout_stats_with_delta)
    _patch(RemoteExperienceMaker, "compute_advantages_and_returns", _advantages_then_fold)


def _patch(owner, name, wrap) -> None:
    current = getattr(owner, name)
    if getattr(current, "_delta_kernels_patch", False):
        return
    patched = wrap(current)
    patched.__wrapped__, patched._delta_kernels_patch = current, True
    setattr(owner, name, patched)
    _PATCHED.append((owner, name, current))


def _init_with_hook(original):
    def init(*args, runtime_env=None, **kwargs):
        merged = dict(runtime_env or {})
        if merged.get("worker_process_setup_hook") not in (None, HOOK):
            raise ValueError("runtime_env.worker_process_setup_hook: already set to "
                             f"{merged['worker_process_setup_hook']!r}; DelTA needs {HOOK!r}")
        merged["worker_process_setup_hook"] = HOOK
        merged["env_vars"] = {**merged.get("env_vars", {}), ENV: os.environ.get(ENV, "null")}
        return original(*args, runtime_env=merged, **kwargs)
    return init


# ---------------------------------------------------------------- policy actor (worker)
def _hf_model(actor) -> torch.nn.Module:
    """The transformers model inside OpenRLHF's Actor (itself maybe inside a DeepSpeed engine)."""
    inner = getattr(actor, "module", actor)
    return getattr(inner, "model", inner)


def action_vectors(hidden: torch.Tensor, attention_mask: torch.Tensor, action_log_probs: torch.Tensor,
                   spec: DeltaSpec) -> torch.Tensor:
    """Vectors aligned with OpenRLHF's action log-probs [B, A]: hidden [B, S, H] or packed
    [1, nnz, H] -> [B, A, D] (v, or z with ``spec.sketch_dim``), 0 where the log-prob is masked."""
    h = core.action_hidden_states(hidden, attention_mask)[:, -action_log_probs.shape[1]:]
    logp = action_log_probs.to(h.device).clamp_max(0)
    return token_sketch(h, logp, sketch_dim=spec.sketch_dim, seed=spec.seed, backend=spec.backend)


def _forward_with_vectors(original):
    def forward(self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None,
                mm_train_inputs_list=None):
        spec = _SPEC
        if spec is None:
            return original(self, sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list)
        if self.strategy.ring_attn_group is not None:
            raise ValueError("ds.ring_attn_size > 1: each rank holds a slice of the hidden states; DelTA's capture "
                             "needs --ds.ring_attn_size 1")
        with capture_hidden_states(_hf_model(self.actor)) as cap:
            log_probs = original(self, sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list)
        vectors = action_vectors(cap.pop(), attention_mask, log_probs, spec)
        self.__dict__.setdefault(_STASH, []).append(vectors.cpu())
        return log_probs
    return forward


def _take_vectors(actor) -> List[torch.Tensor]:
    """Run on the policy actor through ``__ray_call__``: its stashed vectors, in forward order."""
    return actor.__dict__.pop(_STASH, [])


_MISSING = ("DelTA is on but the policy actors returned no vectors: their forward is not patched. Call "
            "delta_kernels.integrations.openrlhf.enable_delta (or delta_runtime_env) in the driver before OpenRLHF "
            "creates its actors, or run `python -m delta_kernels.integrations.openrlhf --delta.k 1 ...`")


# ---------------------------------------------------------------- PPO trainer process (driver side)
def fetch_vectors(group) -> List[torch.Tensor]:
    """One [b, A, D] tensor per experience, in the order of OpenRLHF's ``_flatten_results``: each
    data chunk's first actor (ring/tensor-parallel duplicates hold the same rows)."""
    handles = group._actor_handlers
    taken = ray.get([h.__ray_call__.remote(_take_vectors) for h in handles])
    return [v for per_actor in taken[::group.duplicate_actors] for v in per_actor]


def fold_experiences(spec: DeltaSpec, experiences, vectors: List[torch.Tensor]) -> Dict[str, float]:
    """``experience.advantages *= coef`` with one ``DeltaAccumulator`` over all experiences;
    returns the delta/* metrics."""
    if len(vectors) != len(experiences):
        raise RuntimeError(f"{len(vectors)} vector batches for {len(experiences)} experiences: "
                           + (_MISSING if not vectors else "the policy actors ran other forwards in between"))
    acc = spec.accumulator()
    masks = [e.action_mask.bool() for e in experiences]
    for e, v, m in zip(experiences, vectors, masks):
        if tuple(v.shape[:2]) != tuple(m.shape):
            raise RuntimeError(f"vectors of shape {list(v.shape)} for an action mask of shape {list(m.shape)}: the "
                               "experiences were reordered or split before their advantages")
        acc.add(vectors=v[m], logp=e.action_log_probs[m].float().clamp_max(0), mask=torch.ones(int(m.sum()),
                                                                                               dtype=torch.bool))
    folded = core.fold_accumulated(acc, [e.advantages[m] for e, m in zip(experiences, masks)],
                                   [torch.ones(int(m.sum()), dtype=torch.bool) for m in masks])
    for e, m, coef in zip(experiences, masks, torch.split(folded.result.coef, [int(m.sum()) for m in masks])):
        full = torch.zeros(m.shape, dtype=e.advantages.dtype)
        full[m] = coef.to(full.dtype)
        e.advantages *= full
    return folded.metrics


def _advantages_then_fold(original):
    def compute_advantages_and_returns(self, experiences):
        experiences = original(self, experiences)
        spec = _SPEC
        if spec is not None:
            _LAST_METRICS.clear()
            _LAST_METRICS.update(fold_experiences(spec, experiences, fetch_vectors(self.actor_model_group)))
        return experiences
    return compute_advantages_and_returns


def add_delta_metrics(stats: Dict[str, float]) -> None:
    """Move the last fold's delta/* metrics of this process into ``stats``."""
    if not _LAST_METRICS:
        raise RuntimeError("DelTA is on but this PPO trainer process folded no coefficients: its "
                           f"worker_process_setup_hook ({HOOK}) did not run; start Ray through enable_delta or with "
                           "runtime_env=delta_runtime_env(...)")
    stats.update(_LAST_METRICS)
    _LAST_METRICS.clear()


def _rollout_stats_with_delta(original):
    # Ray ships this closure by value with the actor class (its globals a snapshot of the driver's:
    # _SPEC); the metrics live in the worker's module, reached through a module-level function.
    def _compute_rollout_stats(self, experiences):
        stats = original(self, experiences)
        if _SPEC is not None:
            add_delta_metrics(stats)
        return stats
    return _compute_rollout_stats


# ---------------------------------------------------------------- python -m entry
def _value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_args(argv: List[str]):
    """``--delta.<option> value`` (or ``=value``) out of ``argv``: (options, the rest)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for f in fields(DeltaSpec):
        parser.add_argument(f"--delta.{f.name}", dest=f.name, type=_value, default=argparse.SUPPRESS)
    options, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--delta.")]
    if unknown:
        raise SystemExit(f"{unknown[0].split('=')[0]}: unknown DelTA option; allowed: "
                         + ", ".join(f"--delta.{f.name}" for f in fields(DeltaSpec)))
    return vars(options), rest


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m delta_kernels.integrations.openrlhf --delta.k 1 ... <train_ppo_ray args>``:
    enable_delta with the ``--delta.*`` options, then OpenRLHF's own ``train_ppo_ray`` CLI on the rest."""
    options, rest = split_args(sys.argv[1:] if argv is None else argv)
    enable_delta(**options)
    sys.argv = ["openrlhf.cli.train_ppo_ray", *rest]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from delta_kernels.integrations.openrlhf import main as _main  # the module by its name: Ray pickles it by reference
    _main()
