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


def pytest_generate_tests(metafunc):
    """Every test with a ``backend`` argument runs on each backend of the registry."""
    from backend_cases import generate
    generate(metafunc)
