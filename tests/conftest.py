import os

import pytest
import torch

# Triton kernels run under the interpreter on a machine without a GPU. Must be set before
# any kernel module is imported (triton reads it when @triton.jit runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from delta_kernels._alloc import poisoned  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN (or -1) in every test."""
    with poisoned():
        yield


@pytest.fixture(autouse=True)
def interpreter_tiles(monkeypatch):
    """Under the interpreter a loop iteration costs the same whatever its tile, so the whole-row
    margin kernel takes 16 rows per tile instead of the GPU's 1 (set at call time, the kernel's code
    path is the same; tests/test_triton_launches.py runs the GPU's value)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import importlib
    try:  # the module (the package's attribute of that name is the function)
        margin_pass = importlib.import_module("delta_kernels.triton.margin_pass")
    except ImportError:  # no triton: nothing to set
        return
    monkeypatch.setattr(margin_pass, "ROWS_PER_TILE", 16)
