"""The float64-capable plain-PyTorch reference: the oracle every backend is tested against.

Written straight from the spec in docs/design.md, with no attention to speed. Computes in
float64 when any input is float64, else in float32.
"""
from .coefficients import delta_coefficients
from .fipo import fipo_weights
from .passes import TorchPasses
from .sketch import token_sketch
from .surrogate import clipped_surrogate_loss

PIPELINE_KERNELS = TorchPasses()  # the pipeline's passes, for DeltaAccumulator

__all__ = ["token_sketch", "delta_coefficients", "clipped_surrogate_loss", "PIPELINE_KERNELS", "fipo_weights"]
