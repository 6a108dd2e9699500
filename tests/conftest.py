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
    """Interpreter-sized tiles, set at call time (the kernels' code paths are the GPU's): the
    whole-row margin kernel takes 16 rows per tile instead of 1 (a loop iteration costs the
    interpreter the same whatever its tile; tests/test_triton_launches.py runs the GPU's value), and
    the fused LM head small tiles."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import importlib
    try:  # the module (the package's attribute of that name is the function)
        margin_pass = importlib.import_module("delta_kernels.triton.pass3_margins")
    except ImportError:  # no triton: nothing to set
        return
    monkeypatch.setattr(margin_pass, "ROWS_PER_TILE", 16)
    # the fused LM head: small tiles and 2-tile splits, so that small shapes cross every boundary
    small = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=32, num_warps=8, num_stages=3)
    for name in ("triton_logprob", "triton_logprob_grad"):
        monkeypatch.setattr(importlib.import_module("delta_kernels.fused_linear." + name), "TILE", small)
    monkeypatch.setattr(importlib.import_module("delta_kernels.fused_linear.triton_logprob"), "TILES_PER_SPLIT", 2)


def pytest_generate_tests(metafunc):
    """Every test with a ``backend`` argument runs on each backend of the registry."""
    from backend_cases import generate
    generate(metafunc)
