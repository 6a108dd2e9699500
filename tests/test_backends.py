"""The backend registry: names, devices, dtypes, what auto picks, and that one registry entry
brings a backend under the whole conformance suite."""
import os
import re
import subprocess
import sys

import pytest
import torch

import delta_kernels as dk
from delta_kernels import _backends
from delta_kernels._backends import LM_HEAD, PHASES, RUNS_HERE, Backend, describe_backends, resolve

TESTS = os.path.dirname(os.path.abspath(__file__))


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
    mod = resolve("auto", torch.device("cpu"), torch.float64, "delta_coefficients")
    assert mod.__name__ == "delta_kernels.reference"


def test_auto_on_cpu_prefers_cpp_when_built():
    mod = resolve("auto", torch.device("cpu"), torch.float32, "delta_coefficients")
    want = "delta_kernels.backends.cpp" if "cpp" in dk.available_backends() else "delta_kernels.reference"
    assert mod.__name__ == want


def test_auto_never_picks_the_interpreter():
    """Under TRITON_INTERPRET=1 triton takes CPU tensors when named, but auto keeps to cpp/torch."""
    for op in PHASES:
        assert resolve("auto", torch.device("cpu"), torch.float32, op).__name__ != "delta_kernels.triton"
    lm_head = resolve("auto", torch.device("cpu"), torch.float32, LM_HEAD)
    assert lm_head.__name__ == "delta_kernels.fused_linear.torch_chunked"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_picks_a_gpu_backend():
    mod = resolve("auto", torch.device("cuda"), torch.float32, "delta_coefficients")
    assert mod.__name__ in ("delta_kernels.triton", "delta_kernels.backends.cuda")


def test_gpu_backends_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="does not run on cpu"):
        resolve("cuda", torch.device("cpu"), torch.float32, "token_sketch")


def test_fast_backends_refuse_float64():
    with pytest.raises(TypeError, match="float64"):
        resolve("cpp", torch.device("cpu"), torch.float64, "token_sketch")


def test_the_lm_head_op_is_declared_where_its_module_is():
    with pytest.raises(ValueError, match="lm_head"):
        Backend("x", "delta_kernels.reference", ("cpu",), (torch.float32,), PHASES, 0, lm_head="mod")
    with pytest.raises(ValueError, match="auto"):
        _backends.register(Backend("auto", "delta_kernels.reference", ("cpu",), (torch.float32,), PHASES, 0))
    assert set(_backends.lm_head_backends()) == {"torch", "triton"}


def test_names_come_from_the_registry():
    assert _backends.names() == ("auto", "torch", "cpp", "cuda", "triton")
    from delta_kernels.trainer.config import BACKENDS
    assert BACKENDS == _backends.names()


def test_cpp_is_built_here():
    # The C++ CPU module always builds (setup.py); CI must exercise it.
    assert "cpp" in dk.available_backends()


def _conformance_counts(*args):
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                          os.path.join(TESTS, "test_conformance.py")],
                         cwd=TESTS, capture_output=True, text=True, timeout=600)
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", tail)}
    return res.returncode, counts, tail


def test_a_registered_toy_backend_runs_the_whole_conformance_suite():
    """One registry entry (tests/toy_backend.py: the reference under another name) and nothing
    else: every conformance test runs on it, as many cases as on torch, and passes."""
    rc, toy, tail = _conformance_counts("-p", "toy_backend", "-k", "toy")
    assert rc == 0 and toy.get("passed", 0) > 0 and not toy.get("failed") and not toy.get("skipped"), tail
    rc, torch_only, tail = _conformance_counts("--collect-only", "-k", "torch and not toy")
    collected = re.search(r"(\d+)/\d+ tests collected", tail) or re.search(r"(\d+) tests? collected", tail)
    assert collected and toy["passed"] == int(collected.group(1)), (toy, tail)


def _declare(monkeypatch, name, module, devices, interpreted=False):
    b = Backend(name, module, devices, (torch.float32,), PHASES, -1, interpreted=interpreted)
    monkeypatch.setitem(_backends._REGISTRY, name, b)


def test_available_backends_are_those_that_run_here(monkeypatch):
    """backend_report's words: runs here, no module, no GPU, interpreter only; available_backends()
    lists only what runs here, all=True what imports."""
    _declare(monkeypatch, "gpu_only", "delta_kernels.reference", ("cuda",))
    _declare(monkeypatch, "gpu_interp", "delta_kernels.reference", ("cuda",), interpreted=True)
    _declare(monkeypatch, "unbuilt", "delta_kernels.no_such_module", ("cpu",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = dk.backend_report()
    assert report["torch"] == RUNS_HERE and report["gpu_only"] == "no GPU (it takes CUDA tensors)"
    assert report["gpu_interp"].startswith("no GPU (it takes CUDA tensors, or CPU tensors under TRITON_INTERPRET=1")
    assert report["unbuilt"] == "no module (ModuleNotFoundError: No module named 'delta_kernels.no_such_module')"
    here = dk.available_backends()
    assert here == [n for n, why in report.items() if why == RUNS_HERE] and "torch" in here
    assert not {"gpu_only", "gpu_interp", "unbuilt", "cuda", "triton"} & set(here)
    assert {"gpu_only", "gpu_interp"} <= set(dk.available_backends(all=True)) and \
        "unbuilt" not in dk.available_backends(all=True)
    assert describe_backends().startswith(f"runs here: {', '.join(here)}; ") and "gpu_only: no GPU" in \
        describe_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dk.backend_report()["gpu_interp"].startswith("interpreter only (no GPU: CPU tensors run under")
    assert "gpu_interp" not in dk.available_backends()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert {"gpu_only", "gpu_interp"} <= set(dk.available_backends())
    with pytest.raises(RuntimeError, match=r"'unbuilt' cannot run here: no module \(ModuleNotFoundError"):
        dk.token_sketch(torch.randn(3, 4), -torch.rand(3) - 0.1, backend="unbuilt")
