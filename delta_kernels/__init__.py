"""delta-kernels: DelTA token credit assignment as three phases.

Data flow of one RL step::

    h, logp  --token_sketch-->  v or z = v @ R                 (phase A, no grad, once per batch)
    v/z, advantages, mask  --delta_coefficients-->  coef        (phase B, a few passes over v/z)
    logp, old_logp, advantages * coef  --clipped_surrogate_loss-->  loss, backward   (phase C)

``delta_coefficients`` also takes the hidden states directly and runs phase A inside.
With the LM head fused in (no [tokens x vocab] logits in either phase)::

    h, W_head, targets  --fused_linear_logprob_sketch-->  logp, entropy, z, side sums   (A)
    z, side sums  --delta_coefficients(None, ..., vectors=z, side_sums=...)-->  coef    (B)
    h, W_head, targets, old_logp, advantages, coef  --fused_linear_clipped_surrogate_loss-->  loss  (C)
Phase C aggregates exactly as verl 0.9.1's agg_loss (``agg=`` and verl's normalisers); the
rules, and ``trl_loss_aggregation`` for TRL's loss types, are in ``delta_kernels.aggregation``.
Every call takes ``backend=``: "auto" or a name from ``available_backends()`` (the
registry of delta_kernels._backends; "torch" is the float64-capable reference). Token credit is one registry, ``delta_kernels.credit``: DelTA (before the update, as above),
FIPO (``fipo_weights``) and high-entropy tokens (``entropy_mask``) in the loss, composed by
product (``credit="fipo*entropy"`` on either loss; ``coef=`` carries DelTA). ``DeltaAccumulator`` runs phase B over micro-batches
(add each during the old-log-prob pass, finalize once the advantages are known). ``delta_kernels.naive`` mirrors the published code.
"""
from ._backends import available_backends
from .accumulator import DeltaAccumulator
from .coefficients import DeltaResult, DeltaStats, delta_coefficients
from .credit import FipoWeights, credit_spec, entropy_mask, fipo_weights
from .fused_linear import fused_linear_clipped_surrogate_loss, fused_linear_logprob_sketch
from .sketch import token_sketch
from .sketch_matrix import sketch_matrix
from .surrogate import clipped_surrogate_loss

__all__ = ["token_sketch", "delta_coefficients", "clipped_surrogate_loss", "sketch_matrix",
           "fused_linear_logprob_sketch", "fused_linear_clipped_surrogate_loss",
           "DeltaResult", "DeltaStats", "DeltaAccumulator", "available_backends", "fipo_weights", "FipoWeights",
           "entropy_mask", "credit_spec"]
__version__ = "0.1.0"
