"""The backends under test, read from the registry (delta_kernels._backends).

A test that takes a ``backend`` argument runs once per declared backend (tests/conftest.py):
``backend`` is the name (a str, so ``backend=backend`` works) that also knows the device its
inputs go to and whether it runs under the Triton interpreter. A backend that cannot run here
is skipped with the reason. ``over_cases`` gives a test its cases per backend: the full list, or
a smaller covering list for a backend under the interpreter (slow on the CPU).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import pytest
import torch

from delta_kernels import _backends


class UnderTest(str):
    """A backend name with its ``declaration``, the ``device`` its inputs live on and
    ``interpreted``."""

    declaration: _backends.Backend
    device: str
    interpreted: bool


def under_test(b: _backends.Backend):
    """-> (UnderTest, reason to skip or None)."""
    ut = UnderTest(b.name)
    ut.declaration = b
    gpu = torch.cuda.is_available()
    usable = ["cpu" if d == _backends.ANY else d for d in b.devices
              if d in ("cpu", _backends.ANY) or (d == "cuda" and gpu)]
    ut.interpreted = not usable and b.interpreted and os.environ.get("TRITON_INTERPRET") == "1"
    ut.device = usable[0] if usable else ("cpu" if ut.interpreted else b.devices[0])
    if not usable and not ut.interpreted:
        return ut, f"{b.name} needs {b.device_text()}"
    if b.name not in _backends.available_backends(all=True):  # its module does not import
        return ut, f"{b.name} cannot run here: no module ({_backends._errors.get(b.name)})"
    return ut, None


def backend_params(op: str = "delta_coefficients") -> List:
    """One pytest.param per declared backend with ``op``, skipped where it cannot run."""
    out = []
    for b in _backends.registered():
        if op in b.ops:
            ut, why = under_test(b)
            out.append(pytest.param(ut, id=b.name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


def backend_dtype_params(op: str = "clipped_surrogate_loss") -> List:
    """(backend, dtype) of the backends with ``op``: float32 on each, float64 where declared."""
    out = []
    for p in backend_params(op):
        ut = p.values[0]
        for dt in (torch.float64, torch.float32):
            if dt in ut.declaration.dtypes:
                out.append(pytest.param(ut, dt, id=f"{ut}-{str(dt)[6:]}", marks=p.marks))
    return out


def over_cases(argnames: str, full: Sequence, interpreted: Optional[Sequence] = None,
               ids: Optional[Callable] = None):
    """Decorator: parametrize ``argnames`` jointly with ``backend``, ``full`` for a compiled
    backend, ``interpreted`` (default ``full``) for one under the interpreter."""
    def mark(fn):
        fn.backend_cases = (argnames, list(full), None if interpreted is None else list(interpreted), ids)
        return fn
    return mark


def generate(metafunc) -> None:
    """conftest's pytest_generate_tests: parametrize ``backend`` from the registry."""
    if "backend" not in metafunc.fixturenames:
        return
    if any("backend" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test names its backends
    spec = getattr(metafunc.function, "backend_cases", None)
    if spec is None:
        metafunc.parametrize("backend", backend_params())
        return
    argnames, full, interpreted, ids = spec
    names = [n.strip() for n in argnames.split(",")]
    rows = []
    for p in backend_params():
        ut = p.values[0]
        for case in (interpreted if ut.interpreted and interpreted is not None else full):
            case = case if len(names) > 1 else (case,)
            label = ids(*case) if ids else "-".join(map(str, case))
            rows.append(pytest.param(ut, *case, id=f"{ut}-{label}", marks=p.marks))
    metafunc.parametrize(["backend"] + names, rows)


def cpu_backend_params(op: str = "delta_coefficients") -> List:
    """backend_params(op) of the backends that take CPU tensors here (the interpreter included),
    for tests whose inputs are built on the CPU."""
    return [p for p in backend_params(op) if p.values[0].device == "cpu"]


def cpu_backend_names(op: str = "delta_coefficients") -> List[str]:
    """The names of the backends that run on CPU tensors here (plain strings)."""
    return [str(p.values[0]) for p in cpu_backend_params(op) if not p.marks]


def gpu_backend_params(op: str = "delta_coefficients") -> List:
    """backend_params(op) of the backends whose inputs go to a CUDA device (none without a GPU,
    but the GPU-only backends, skipped)."""
    return [p for p in backend_params(op) if p.values[0].device == "cuda"]
