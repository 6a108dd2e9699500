"""Backend selection: names, devices, dtypes and what auto picks."""
import pytest
import torch

import delta_kernels as dk
from delta_kernels._backends import resolve


def test_unknown_backend_is_refused_by_every_call():
    h = torch.randn(4, 3)
    logp = -torch.rand(4)
    with pytest.raises(ValueError, match="backend"):
        dk.token_sketch(h, logp, backend="cudnn")
    with pytest.raises(ValueError, match="backend"):
        dk.delta_coefficients(h, logp, torch.randn(4), torch.ones(4, dtype=torch.bool), backend="nope")
    with pytest.raises(ValueError, match="backend"):
        dk.clipped_surrogate_loss(logp, logp, torch.randn(4), torch.ones(4), backend="")


def test_float64_auto_takes_the_reference():
    assert resolve("auto", torch.device("cpu"), torch.float64, "delta_coefficients").__name__ == "delta_kernels.reference"


def test_auto_on_cpu_prefers_cpp_when_built():
    mod = resolve("auto", torch.device("cpu"), torch.float32, "delta_coefficients")
    if "cpp" in dk.available_backends() and hasattr(__import__("delta_kernels.backends.cpp").backends.cpp,
                                                      "delta_coefficients"):
        assert mod.__name__ == "delta_kernels.backends.cpp"
    else:
        assert mod.__name__ == "delta_kernels.reference"


def test_gpu_backends_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="does not run on cpu"):
        resolve("cuda", torch.device("cpu"), torch.float32, "token_sketch")


def test_fast_backends_refuse_float64():
    with pytest.raises(TypeError, match="float64"):
        resolve("cpp", torch.device("cpu"), torch.float64, "token_sketch")


def test_cpp_is_built_here():
    # The C++ CPU module always builds (setup.py); CI must exercise it.
    assert "cpp" in dk.available_backends()
