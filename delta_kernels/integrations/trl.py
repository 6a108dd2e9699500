"""Credit methods inside TRL's ``GRPOTrainer``: change one class name and pass ``delta=`` / ``credit=``.

    from delta_kernels.integrations.trl import DeltaGRPOTrainer
    trainer = DeltaGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                               delta=dict(k=1, lam_min=0.8, lam_max=1.2, sketch_dim=None, backend="auto"))
    # DelTA on the whole LM-head gradient: delta=dict(k=1, vectors="head", vocab_sketch_dim=16, sketch_dim=64)

Every method of delta_kernels.credit, one line each (``credit=`` takes a spec string or a credit_spec):

    DeltaGRPOTrainer(..., delta=dict(k=1))                                  # DelTA (or credit="delta")
    DeltaGRPOTrainer(..., credit="fipo")                                    # FIPO, paper-run options
    DeltaGRPOTrainer(..., credit=credit_spec("fipo", fipo=dict(decay_rate=64)))  # FIPO, own options
    DeltaGRPOTrainer(..., credit=credit_spec("entropy", entropy=dict(top_quantile=0.2)))  # 80/20 tokens
    DeltaGRPOTrainer(..., credit="delta*fipo", delta=dict(k=1))             # products: delta*entropy,
                                                                            # fipo*entropy, delta*fipo*entropy

Per generation batch, the hidden states entering the LM head are captured from the decoder body
(``capture_hidden_states``) during a no-grad log-prob pass, the coefficients are computed over
the whole generation batch (all processes: the statistics are global over the accelerator's
process group), and TRL's per-sequence advantages [B] become per-token ``advantages * coef``
[B, T], which TRL's own loss (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``) consumes unchanged.

Forwards: when TRL runs its old-log-prob pass (``gradient_accumulation_steps`` not a multiple
of ``steps_per_generation * num_iterations``, or vLLM importance-sampling correction), the
capture rides on it: zero extra forwards. Otherwise (TRL's on-policy default) one extra no-grad
pass per generation batch, chunked like TRL's own (``per_device_train_batch_size`` rows a forward).
Each forward's captured rows go into a ``DeltaAccumulator`` (store "auto"), finalized once the
advantages exist, with TRL's loss mask (``completion_mask * tool_mask``: tool-output tokens are
marked only after the pass) as its late mask. Memory: the [B, T, H] hidden states of the
generation batch, kept by reference (on a GPU, beyond a quarter of its memory, in host memory),
or only z [B, T, r] float32 with ``sketch_dim=r``; freed once the coefficients are computed.

Entropy (``credit="entropy"``) runs inside TRL's own loss, as its ``top_entropy_quantile`` does,
with the mask of ``delta_kernels.entropy_mask`` over all processes (``get_high_entropy_mask``).

FIPO (a spec with ``fipo``) changes the loss: ``_compute_loss`` is replaced by the library's
dual-clip surrogate, ``clipped_surrogate_loss(logp, old_logp, advantages, mask, credit=<the
in-loss part of the spec>, clip_low=epsilon, clip_high=epsilon_high, clip_c=c)``, FIPO's weights
recomputed at every loss call from the current (detached) log-probs and the rollout's
``old_per_token_logps`` (TRL's on-policy default has none: the current ones, so every weight is
1); rows FIPO drops (more than one token with A < 0 and ratio > c) leave the loss. Normalised
exactly as TRL's ``loss_type`` (grpo, bnpo, dr_grpo, dapo; ``delta_kernels.aggregation.
trl_loss_aggregation``), with TRL's normalisers computed from its mask before the drop (as
TRL's dapo and verl's global token count are fixed before the loss). c is ``GRPOConfig.delta``
(TRL's two-sided clip, the same bound on the ratio) when set, else 10 (the FIPO paper run's).
Refused with FIPO (TRL features this loss does not redo): ``beta`` != 0, sequence-level
importance sampling, ``off_policy_mask_threshold``, vLLM importance-sampling correction, the
entropy bonus, and the MoE auxiliary loss. Logged: TRL's ``entropy``, the surrogate's
``clip_frac`` / ``clip_frac_lower`` and the methods' ``fipo/weight_mean``, ``weight_min``,
``weight_max``, ``rows_dropped``, ``clip_frac`` (and ``entropy/threshold``, ``kept_frac``).

Targets trl 1.16.0. It overrides three methods: ``_generate_and_score_completions`` (calls the
original, then replaces ``advantages``), ``_get_per_token_logps_and_entropies`` (captures
around the original during the old-log-prob pass) and ``_compute_loss`` (only with FIPO).
``delta=None`` (or ``k=None``) and no ``credit=`` leave all as GRPOTrainer's; evaluation keeps
TRL's advantages. The trainer's ``delta=`` is not ``GRPOConfig.delta`` (TRL's two-sided
clipping bound), which keeps its meaning.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._optional import require
from ..accumulator import DeltaAccumulator
from ..aggregation import trl_loss_aggregation
from . import core
from ..credit import IN_LOSS, credit_spec
from ..credit.entropy import entropy_mask
from ..surrogate import clipped_surrogate_loss
from .capture import capture_hidden_states, lm_head_parameters
from .core import DeltaSpec, response_hidden_states

_trl = require("trl", "trl")
GRPOTrainer = _trl.GRPOTrainer

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")
FIPO_CLIP_C = 10.0  # the dual-clip bound c when GRPOConfig.delta is unset: the FIPO paper run's


class DeltaGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with DelTA token coefficients folded into the advantages.

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer``.
        delta: None (plain GRPO) or a dict of ``delta_coefficients`` options: ``k``, ``lam_min``,
            ``lam_max``, ``eps``, ``sketch_dim``, ``seed``, ``backend``; and ``vectors="head"``
            (with ``vocab_sketch_dim``) for the LM-head gradient's factors (head_gradient_sketch on the
            captured states, the head's weight and the completion ids; memory N (r1 + r2)).
        credit: None (``delta=`` alone decides), or a credit spec (delta_kernels.credit) of
            "delta", "fipo", "entropy" or a product of them ("delta*entropy", "delta*fipo",
            "fipo*entropy", "delta*fipo*entropy"): DelTA takes its options from ``delta=``
            (default: the defaults), FIPO and entropy theirs from the spec
            (``credit_spec("fipo", fipo=dict(decay_rate=64))``). Entropy alone runs inside TRL's
            own loss as its ``top_entropy_quantile`` does, with the mask from
            delta_kernels.entropy_mask over all processes; with FIPO the loss is the library's
            dual-clip surrogate with TRL's normalisation (module docstring).
    Logs ``delta/coef_std``, ``delta/coef_min``, ``delta/coef_max`` (over valid tokens of all
    processes), ``delta/gamma_pos``, ``delta/gamma_neg``, ``delta/n_pos``, ``delta/n_neg``; with
    FIPO also its metrics and the surrogate's (module docstring).
    The last coefficients are kept in ``self.delta_last`` (a DeltaResult) for inspection.
    """

    def __init__(self, *args, delta=None, credit=None, **kwargs):
        self.credit = None if credit is None else credit_spec(credit)
        names = () if self.credit is None else tuple(m.name for m in self.credit.methods)
        # with FIPO the in-loss part of the spec runs in the library's surrogate (_compute_loss)
        self._loss_credit = self.credit.of_kind(IN_LOSS) if "fipo" in names else None
        if self.credit is not None:
            if delta is not None and "delta" not in names:
                raise ValueError(f"delta: DelTA options given, but credit {self.credit.name!r} does not use delta")
            delta = ({} if delta is None else delta) if "delta" in names else None
        self.delta_spec: Optional[DeltaSpec] = DeltaSpec.parse(delta)
        self._delta_accumulator: Optional[DeltaAccumulator] = None
        self.delta_last = None
        super().__init__(*args, **kwargs)
        if self.delta_spec is not None and self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type: {self.loss_type!r} is not supported with delta=; use one of "
                             f"{list(SUPPORTED_LOSS_TYPES)} (their losses take per-token advantages)")
        if "entropy" in names:
            if self.top_entropy_quantile != 1.0:
                raise ValueError("top_entropy_quantile: set in GRPOConfig and by credit='entropy'; give it once")
            self.top_entropy_quantile = self.credit.option("entropy").top_quantile
        if self._loss_credit is not None:
            self._check_fipo_loss()

    def _check_fipo_loss(self) -> None:
        """Refuse the GRPOTrainer options whose terms the FIPO loss (_compute_loss) does not redo."""
        refused = [(self.loss_type not in SUPPORTED_LOSS_TYPES, "loss_type", f"{self.loss_type!r}; use one of "
                    f"{list(SUPPORTED_LOSS_TYPES)}"),
                   (self.beta != 0.0, "beta", "the KL term; set beta=0.0"),
                   (self.importance_sampling_level != "token", "importance_sampling_level",
                    "FIPO weighs tokens; use 'token'"),
                   (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold", "set it to None"),
                   (bool(self.use_vllm and self.vllm_importance_sampling_correction),
                    "vllm_importance_sampling_correction", "set it to False"),
                   (self._entropy_bonus_enabled, "entropy_coef", "the entropy bonus; set entropy_coef=0"),
                   (self.aux_loss_enabled, "router_aux_loss_coef", "the MoE auxiliary loss; set it to 0")]
        for bad, name, why in refused:
            if bad:
                raise ValueError(f"{name}: not supported with credit {self.credit.name!r} (FIPO's loss replaces "
                                 f"TRL's): {why}")

    def _compute_loss(self, model, inputs):
        """With FIPO in the spec: the library's dual-clip surrogate with the spec's in-loss methods,
        normalised as TRL's loss_type (module docstring). GRPOTrainer's otherwise."""
        if self._loss_credit is None:
            return super()._compute_loss(model, inputs)
        if any(inputs.get(key) is not None for key in MULTIMODAL_KEYS):
            raise NotImplementedError(f"credit {self.credit.name!r}: multimodal inputs are not supported by the FIPO "
                                      "loss of DeltaGRPOTrainer yet")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies = self._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1), completion_ids.size(1),
            compute_entropy=True)[:2]
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        mode = "train" if self.model.training else "eval"
        agg = trl_loss_aggregation(
            self.loss_type, mask, max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"), num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation, training=mode == "train")
        clip_c = FIPO_CLIP_C if self.args.delta is None else float(self.args.delta)
        loss, metrics = clipped_surrogate_loss(
            logps, old, inputs["advantages"], mask, credit=self._loss_credit, entropy=entropies.detach(),
            credit_group=self._process_group(), clip_low=self.epsilon_low, clip_high=self.epsilon_high,
            clip_c=clip_c, **agg)
        metrics["entropy"] = (entropies.detach() * mask).sum() / mask.sum().clamp(min=1)
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather(value.detach().float()).mean().item())
        return loss

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """With credit "entropy": delta_kernels.entropy_mask over every process (TRL's own otherwise)."""
        if self.credit is None or "entropy" not in [m.name for m in self.credit.methods]:
            return super().get_high_entropy_mask(entropies, mask, threshold)
        return entropy_mask(entropies, mask, top_quantile=self.credit.option("entropy").top_quantile,
                            process_group=self._process_group())

    def _runs_old_logprob_pass(self) -> bool:
        """TRL 1.16's own condition for computing old_per_token_logps in _generate_and_score_completions."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.args.gradient_accumulation_steps % generate_every != 0
                or bool(self.use_vllm and self.vllm_importance_sampling_correction))

    def _process_group(self):
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            return torch.distributed.group.WORLD
        return None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        acc = self._delta_accumulator
        if acc is None or model is not self.model:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        self._delta_accumulator = None  # only the first policy pass (the old log-probs), never the reference pass
        with capture_hidden_states(model) as cap:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        logps = out[0]
        start = 0
        head = lm_head_parameters(model) if self.delta_spec.vectors == "head" else None
        for h in cap.hidden_states:  # one body forward per chunk of rows, in order
            rows = h.shape[0]
            hidden = response_hidden_states(h, logits_to_keep)
            logp = logps[start:start + rows].clamp_max(0)  # clamp: a fused head's rounding
            mask = attention_mask[start:start + rows, -logits_to_keep:]
            if head is None:
                acc.add(hidden, logp, mask)
            else:
                targets = input_ids[start:start + rows, -logits_to_keep:]
                acc.add(None, logp, mask, head_vectors=self.delta_spec.head_factors(hidden, *head, targets,
                                                                                     self.temperature))
            start += rows
        if start != logps.shape[0]:
            raise RuntimeError(f"captured {start} rows for {logps.shape[0]} log-prob rows: a body forward was missed")
        return out

    def _generate_and_score_completions(self, inputs):
        if self.delta_spec is None or not self.model.training:
            return super()._generate_and_score_completions(inputs)
        acc = self.delta_spec.accumulator(self._process_group())
        rides_on_trl = self._runs_old_logprob_pass()
        self._delta_accumulator = acc if rides_on_trl else None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._delta_accumulator = None
        if any(key in output for key in MULTIMODAL_KEYS):
            raise NotImplementedError("delta=: multimodal inputs are not supported by DeltaGRPOTrainer yet; "
                                      "pass delta=None")
        completion_ids, prompt_ids = output["completion_ids"], output["prompt_ids"]
        if not rides_on_trl:  # on-policy: one no-grad pass, chunked like TRL's own old-log-prob pass
            self._delta_accumulator = acc
            try:
                with torch.no_grad():
                    self._get_per_token_logps_and_entropies(
                        self.model, torch.cat([prompt_ids, completion_ids], dim=1),
                        torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1), completion_ids.size(1),
                        batch_size=self.args.per_device_train_batch_size)
            finally:
                self._delta_accumulator = None
        if len(acc) == 0:
            raise RuntimeError("delta=: the old-log-prob pass ran no captured forward; this TRL version is not "
                               "the 1.16 this trainer targets")
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        # TRL's loss mask, known only now (tool_mask), ANDed with the masks of the pass
        folded = core.fold_accumulated(acc, output["advantages"], mask, gather=self.accelerator.gather)
        output["advantages"] = folded.advantages
        self.delta_last = folded.result
        for name, value in folded.metrics.items():
            self._metrics["train"][name].append(value)
        return output
