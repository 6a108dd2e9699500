"""The float64-capable plain-PyTorch reference: the oracle every backend is tested against.

Written straight from the spec in docs/design.md, with no attention to speed. Computes in
float64 when any input is float64, else in float32.
"""
from ..pipeline import PassKernels
from .coefficients import delta_coefficients
from .fipo import fipo_weights
from .passes import TorchPasses
from .sketch import token_sketch
from .surrogate import clipped_surrogate_loss

_passes = TorchPasses()
PIPELINE_KERNELS = PassKernels(_passes.token_vectors, _passes.side_sums, _passes.margin_pass)  # for DeltaAccumulator

__all__ = ["token_sketch", "delta_coefficients", "clipped_surrogate_loss", "PIPELINE_KERNELS", "fipo_weights"]
