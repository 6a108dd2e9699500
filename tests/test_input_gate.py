"""The gate in front of every kernel: any tensor a user can build from public torch APIs is
either read correctly or refused with an error naming the argument, on every backend; parameters
that would overflow or underflow in the compute dtype are refused by name."""
import os
import subprocess
import sys

import pytest
import torch

import delta_kernels as dk
from helpers import make_batch
from test_reliability import BACKENDS

ALL = ["auto"] + BACKENDS


def raises(name, fn, exc=(ValueError, TypeError)):
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(name + ":"), f"error does not name {name!r}: {info.value}"
    return str(info.value)


def calls(hidden=None, logp=None, adv=None, mask=None, old=None, coef=None, backend="auto", check_values=True):
    """The three public calls on one batch, any input replaced."""
    h0, lp0, a0, m0 = make_batch(3, 4, 8, seed=1, seq_level=False)
    h, lp = h0 if hidden is None else hidden, lp0 if logp is None else logp
    a, m = a0 if adv is None else adv, m0 if mask is None else mask
    old = lp0 - 0.1 if old is None else old
    kw = dict(backend=backend, check_values=check_values)
    return {
        "token_sketch": lambda: dk.token_sketch(h, lp, **kw),
        "delta_coefficients": lambda: dk.delta_coefficients(h, lp, a, m, **kw),
        "clipped_surrogate_loss": lambda: dk.clipped_surrogate_loss(lp, old, a, m, coef=coef, **kw),
    }


def meta_like(t):
    """A meta tensor whose storage offset is large: its data_ptr() is that offset."""
    return torch.empty((1 << 20) + t.numel(), device="meta")[1 << 20:].view(t.shape)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("check_values", [True, False])
@pytest.mark.parametrize("name", ["hidden", "logp", "advantages", "mask"])
def test_meta_tensors_are_refused(backend, check_values, name):
    h, lp, a, m = make_batch(3, 4, 8, seed=1, seq_level=False)
    args = dict(hidden=h, logp=lp, adv=a, mask=m)
    key = {"advantages": "adv"}.get(name, name)
    args[key] = meta_like(args[key]) if name != "mask" else torch.ones(3, 4, dtype=torch.bool, device="meta")
    for op, fn in calls(**args, backend=backend, check_values=check_values).items():
        if op == "token_sketch" and name in ("advantages", "mask"):
            continue
        if op == "clipped_surrogate_loss" and name == "hidden":
            continue
        msg = raises(name, fn)
        assert "meta" in msg


class Tagged(torch.Tensor):
    pass


@pytest.mark.parametrize("backend", ALL)
def test_subclasses_zero_tensors_sparse_and_nested_are_refused(backend):
    h, lp, a, m = make_batch(3, 4, 8, seed=1, seq_level=False)
    raises("hidden", calls(hidden=h.as_subclass(Tagged), backend=backend)["delta_coefficients"])
    raises("hidden", calls(hidden=h.as_subclass(Tagged), backend=backend)["token_sketch"])
    raises("coef", calls(coef=torch.rand(3, 4).as_subclass(Tagged), backend=backend)["clipped_surrogate_loss"])
    zero = torch._efficientzerotensor((3, 4, 8))
    raises("hidden", calls(hidden=zero, backend=backend)["token_sketch"])
    raises("hidden", calls(hidden=zero, backend=backend)["delta_coefficients"])
    raises("advantages", calls(adv=torch._efficientzerotensor((3, 4)), backend=backend)["clipped_surrogate_loss"])
    raises("hidden", calls(hidden=h.to_sparse(), backend=backend)["delta_coefficients"])
    raises("mask", calls(mask=m.to_sparse(), backend=backend)["delta_coefficients"])
    raises("logp", calls(logp=lp.to_sparse(), backend=backend)["clipped_surrogate_loss"])


def test_parameters_pass_the_gate():
    h, lp, a, m = make_batch(3, 4, 8, seed=1, seq_level=False)
    out = dk.delta_coefficients(torch.nn.Parameter(h), lp, a, m, backend="cpp" if "cpp" in BACKENDS else "torch")
    ref = dk.delta_coefficients(h, lp, a, m, backend="cpp" if "cpp" in BACKENDS else "torch")
    assert torch.equal(out.coef, ref.coef)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negated_and_conjugated_views_are_read_as_their_values(backend):
    """x.conj().imag and torch._neg_view carry a lazy negation bit (kept by .contiguous()); the
    kernels read raw memory, so the gate resolves it: results equal those of the plain values."""
    h, lp, a, m = make_batch(3, 4, 8, seed=5, seq_level=False)
    coef = torch.rand(3, 4) + 0.5

    def neg(x):  # a view holding -x in memory, reading as x
        return torch._neg_view(-x)

    def conj_imag(x):
        return torch.complex(torch.zeros_like(x), -x).conj().imag

    for view in (neg, conj_imag):
        assert view(h).is_neg() and torch.equal(view(h), h)
        ref = dk.delta_coefficients(h, lp, a, m, k=1, backend=backend)
        out = dk.delta_coefficients(view(h), view(lp), view(a), m, k=1, backend=backend)
        assert torch.equal(out.coef, ref.coef), f"{view.__name__}: coefficients differ"
        z = dk.token_sketch(view(h).contiguous(), lp, sketch_dim=4, backend=backend)
        assert torch.equal(z, dk.token_sketch(h, lp, sketch_dim=4, backend=backend))
        old = lp - 0.1
        ref_l, _ = dk.clipped_surrogate_loss(lp, old, a, m, coef=coef, backend=backend)
        out_l, _ = dk.clipped_surrogate_loss(view(lp), view(old), view(a), m, coef=view(coef), backend=backend)
        assert torch.equal(out_l, ref_l), f"{view.__name__}: surrogate differs"


def test_auto_never_picks_a_backend_that_cannot_read_the_device():
    from delta_kernels._backends import resolve
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="backend"):
        resolve("auto", meta, torch.float32, "token_sketch")
    other = torch.device("xpu") if hasattr(torch, "xpu") else torch.device("mps")
    assert resolve("auto", other, torch.float32, "token_sketch").__name__ == "delta_kernels.reference"


def test_process_group_must_be_a_group():
    for bad in ("world", 0, object()):
        raises("process_group", lambda: dk.delta_coefficients(*make_batch(2, 3, 4, seed=0), process_group=bad))


@pytest.mark.parametrize("backend", ALL)
def test_parameters_that_overflow_float32_are_refused(backend):
    h, lp, a, m = make_batch(3, 4, 8, seed=1, seq_level=False)
    raises("eps", lambda: dk.delta_coefficients(h, lp, a, m, eps=1e-46, backend=backend))
    raises("lam_max", lambda: dk.delta_coefficients(h, lp, a, m, lam_min=0.0, lam_max=1e300, backend=backend))
    raises("lam_max", lambda: dk.delta_coefficients(h, lp, a, m, lam_min=1e-30, lam_max=1.0, backend=backend))
    raises("clip_c", lambda: dk.clipped_surrogate_loss(lp, lp - 0.1, a, m, clip_c=1e39, backend=backend))
    for big in (1e38, -1e38, 1e25):
        a2 = a.clone()
        a2[m] = big * a2[m].sign()
        raises("advantages", lambda: dk.delta_coefficients(h, lp, a2, m, backend=backend))


def test_float64_takes_the_parameters_float32_cannot():
    """The limits are those of the compute dtype: float64 inputs take them (and stay finite)."""
    h, lp, a, m = (t.double() if t.is_floating_point() else t for t in make_batch(3, 4, 8, seed=1, seq_level=False))
    for kw in (dict(eps=1e-46), dict(lam_min=0.0, lam_max=1e200)):
        assert torch.isfinite(dk.delta_coefficients(h, lp, a, m, **kw).coef).all()
    assert torch.isfinite(dk.delta_coefficients(h, lp, a * 1e38, m).coef).all()


def test_fused_calls_gate_and_temperature():
    from delta_kernels.fused_linear import fused_linear_clipped_surrogate_loss, fused_linear_logprob_sketch
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (2, 5), generator=g)
    raises("temperature", lambda: fused_linear_logprob_sketch(h, w, y, temperature=1e-40))
    raises("temperature", lambda: fused_linear_logprob_sketch(h * 1e30, w * 1e8, y, temperature=1e-30))
    raises("weight", lambda: fused_linear_logprob_sketch(h, w.as_subclass(Tagged), y))
    raises("weight", lambda: fused_linear_logprob_sketch(h, meta_like(w), y))
    raises("targets", lambda: fused_linear_logprob_sketch(h, w, y.to_sparse()))
    old, adv, mask = -torch.rand(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    raises("clip_c", lambda: fused_linear_clipped_surrogate_loss(h, w, y, old, adv, mask, clip_c=1e39))
    raises("old_logp", lambda: fused_linear_clipped_surrogate_loss(h, w, y, meta_like(old), adv, mask))
    ref, _ = fused_linear_clipped_surrogate_loss(h, w, y, old, adv, mask)
    out, _ = fused_linear_clipped_surrogate_loss(h, torch._neg_view(-w), y, old, adv, mask)
    assert torch.equal(out, ref)


_DTENSOR = """
import os, torch, torch.distributed as dist
import delta_kernels as dk
from delta_kernels.fused_linear import fused_linear_logprob_sketch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
h, lp = torch.randn(3, 4, 8), -torch.rand(3, 4)
hd = distribute_tensor(h, mesh, [Replicate()])
for backend in %r:
    for fn in (lambda: dk.token_sketch(hd, lp, backend=backend),
               lambda: dk.delta_coefficients(hd, lp, torch.randn(3), torch.ones(3, 4, dtype=torch.bool),
                                             backend=backend, check_values=False)):
        try:
            fn()
            raise SystemExit("a DTensor was accepted")
        except TypeError as e:
            assert str(e).startswith("hidden:") and "full_tensor()" in str(e), e
w = torch.nn.Parameter(distribute_tensor(torch.randn(30, 8), mesh, [Replicate()]))
try:
    fused_linear_logprob_sketch(h, w, torch.randint(0, 30, (3, 4)))
    raise SystemExit("a DTensor weight was accepted")
except TypeError as e:
    assert str(e).startswith("weight:") and "full_tensor()" in str(e), e
print("refused")
"""


def _run(code: str, timeout: int = 120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_dtensors_are_refused_with_full_tensor_advice():
    pytest.importorskip("torch.distributed.tensor")
    res = _run(_DTENSOR % (ALL,))
    assert res.returncode == 0 and "refused" in res.stdout, res.stderr[-3000:]


_OOM = """
import resource, torch
import delta_kernels as dk
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
# r = 2**25: the output, sums, R, its panels and the block partials (~0.9 GiB) fit under the limit;
# the 4 scratch rows of z (0.5 GiB) do not
resource.setrlimit(resource.RLIMIT_AS, (used + (1150 << 20), hard))
try:
    dk.token_sketch(torch.randn(1, 1), -torch.rand(1), sketch_dim=2**25, backend="cpp", check_values=False)
    print("fit")
except MemoryError:
    print("MemoryError")
"""


@pytest.mark.skipif("cpp" not in BACKENDS, reason="cpp backend not built")
def test_native_allocation_failure_is_a_memory_error():
    """Scratch rows are allocated before the OpenMP region: bad_alloc reaches Python as
    MemoryError instead of aborting the process."""
    res = _run(_OOM)
    assert res.returncode == 0, f"the process died ({res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.strip() == "MemoryError", res.stdout
