"""Fused LM-head kernels: DelTA's two phases without the [tokens x vocab] logits.

    fused_linear_logprob_sketch         phase A: hidden, LM head, targets -> logp, entropy,
                                        token vectors v (or sketch z = v @ R), side sums
    fused_linear_clipped_surrogate_loss phase C: the weighted dual-clip DAPO surrogate straight
                                        from hidden and the LM head, with gradients for both

Both stream the vocabulary in tiles with an online log-sum-exp in float32. Backends:
"triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1) and "torch" (the same
algorithm in chunked plain torch, for CPU tensors, float64 included); "auto" picks triton on
CUDA and torch on CPU.
"""
from .api import fused_linear_clipped_surrogate_loss, fused_linear_logprob_sketch

__all__ = ["fused_linear_logprob_sketch", "fused_linear_clipped_surrogate_loss"]
