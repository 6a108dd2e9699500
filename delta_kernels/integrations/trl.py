"""DelTA inside TRL's ``GRPOTrainer``: change one class name and pass ``delta=``.

    from delta_kernels.integrations.trl import DeltaGRPOTrainer
    trainer = DeltaGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                               delta=dict(k=1, lam_min=0.8, lam_max=1.2, sketch_dim=None, backend="auto"))

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

Targets trl 1.16.0. It overrides two methods: ``_generate_and_score_completions`` (calls the
original, then replaces ``advantages``) and ``_get_per_token_logps_and_entropies`` (captures
around the original during the old-log-prob pass). ``delta=None`` (or ``k=None``) leaves both
as GRPOTrainer's; so does evaluation (its advantages stay TRL's). The trainer's ``delta=`` is not
``GRPOConfig.delta`` (TRL's two-sided clipping bound), which keeps its meaning.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from .._optional import require
from ..accumulator import DeltaAccumulator
from ..coefficients import DeltaResult
from ..credit import credit_spec
from ..credit.entropy import entropy_mask
from .capture import capture_hidden_states, response_hidden_states
from .options import DeltaSpec

_trl = require("trl", "trl")
GRPOTrainer = _trl.GRPOTrainer

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


class DeltaGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with DelTA token coefficients folded into the advantages.

    Args:
        *args, **kwargs: those of ``trl.GRPOTrainer``.
        delta: None (plain GRPO) or a dict of ``delta_coefficients`` options: ``k``, ``lam_min``,
            ``lam_max``, ``eps``, ``sketch_dim``, ``seed``, ``backend``.
        credit: None (``delta=`` alone decides), or a credit spec (delta_kernels.credit) of "delta",
            "entropy" or "delta*entropy": DelTA takes its options from ``delta=`` (default: the
            defaults), entropy its ``top_quantile`` from the spec, and runs inside TRL's own
            loss as its ``top_entropy_quantile`` does, with the mask from delta_kernels.entropy_mask
            over all processes. FIPO changes the loss itself, which TRL's loss does not let in:
            refused here (use the verl plugin's "delta_fipo" or the library's losses).
    Logs ``delta/coef_std``, ``delta/coef_min``, ``delta/coef_max`` (over valid tokens of all
    processes), ``delta/gamma_pos``, ``delta/gamma_neg``, ``delta/n_pos``, ``delta/n_neg``.
    The last coefficients are kept in ``self.delta_last`` (a DeltaResult) for inspection.
    """

    def __init__(self, *args, delta=None, credit=None, **kwargs):
        self.credit = None if credit is None else credit_spec(credit)
        names = () if self.credit is None else tuple(m.name for m in self.credit.methods)
        if set(names) - {"delta", "entropy"}:
            raise NotImplementedError(f"credit: {self.credit.name!r}: DeltaGRPOTrainer runs delta and entropy inside "
                                      "TRL's loss; FIPO changes the loss (verl plugin 'delta_fipo', or "
                                      "delta_kernels.clipped_surrogate_loss(credit='fipo'))")
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
        for h in cap.hidden_states:  # one body forward per chunk of rows, in order
            rows = h.shape[0]
            acc.add(response_hidden_states(h, logits_to_keep), logps[start:start + rows].clamp_max(0),
                    attention_mask[start:start + rows, -logits_to_keep:])  # clamp: a fused head's rounding
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
        if any(key in output for key in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")):
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
        result = _joined(acc.finalize(output["advantages"], mask=mask))
        output["advantages"] = result.weighted_advantages.to(output["advantages"].dtype)
        self.delta_last = result
        self._log_delta(result, mask.bool())
        return output

    def _log_delta(self, result, mask: torch.Tensor) -> None:
        coef = result.coef[mask].float()
        big = torch.finfo(torch.float32).max
        local = torch.stack([coef.sum(), (coef * coef).sum(), torch.tensor(float(coef.numel()), device=coef.device),
                             -coef.min() if coef.numel() else torch.tensor(-big, device=coef.device),
                             coef.max() if coef.numel() else torch.tensor(-big, device=coef.device)])
        rows = self.accelerator.gather(local[None]).reshape(-1, 5)
        n = rows[:, 2].sum().clamp_min(1)
        mean = rows[:, 0].sum() / n
        std = (rows[:, 1].sum() / n - mean * mean).clamp_min(0).sqrt()
        metrics = self._metrics["train"]
        st = result.stats
        for name, value in (("coef_std", std), ("coef_min", -rows[:, 3].max()), ("coef_max", rows[:, 4].max()),
                            ("gamma_pos", st.gamma_pos), ("gamma_neg", st.gamma_neg), ("n_pos", st.n_pos),
                            ("n_neg", st.n_neg)):
            metrics[f"delta/{name}"].append(float(value))


def _joined(results: List[DeltaResult]) -> DeltaResult:
    """The accumulator's per-add results (row chunks [b, T] of one generation batch) as one [B, T]."""
    first = results[0]
    stats = dataclasses.replace(first.stats, pred=torch.cat([r.stats.pred for r in results]))
    return DeltaResult(coef=torch.cat([r.coef for r in results]),
                       weighted_advantages=torch.cat([r.weighted_advantages for r in results]), stats=stats)
