"""Fused LM-head kernels: DelTA's two phases without the [tokens x vocab] logits.

    fused_linear_logprob_sketch         phase A: hidden, LM head, targets -> logp, entropy,
                                        token vectors v (or sketch z = v @ R), side sums
    fused_linear_clipped_surrogate_loss phase C: the weighted dual-clip DAPO surrogate straight
                                        from hidden and the LM head, with gradients for both

Both stream the vocabulary in tiles with an online log-sum-exp in float32. The backends are
those of the registry (delta_kernels._backends) that declare the LM-head op: the Triton
kernels, and the same algorithm in chunked plain torch (float64 included); "auto" takes the
highest priority one for the tensors' device (docs/backends.md).
"""
from .api import fused_linear_clipped_surrogate_loss, fused_linear_logprob_sketch

__all__ = ["fused_linear_logprob_sketch", "fused_linear_clipped_surrogate_loss"]
