"""Run by test_wheel.py inside a fresh venv that holds only the built wheel and its declared
dependencies: the installed package imports, lists its backends, and each phase on the cpp
backend matches the float64 reference (the float32 tolerance of docs/design.md: relative error < 1e-5).

Run as ``python wheel_smoke.py``; prints one line and exits 0 when everything holds.
"""
from pathlib import Path

import torch

import delta_kernels as dk


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def main():
    assert "site-packages" in Path(dk.__file__).resolve().parts, f"not the installed package: {dk.__file__}"
    backends, report = dk.available_backends(), dk.backend_report()
    assert backends[:2] == ["torch", "cpp"], report  # triton joins them where a GPU is (a CUDA torch brings it)
    assert report["cuda"].startswith("no module"), report  # built with DELTA_KERNELS_CUDA=0
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(3, 11, 40, generator=gen)
    old_logp = -torch.rand(3, 11, generator=gen) * 4 - 1e-3
    adv = torch.randn(3, generator=gen)
    mask = torch.rand(3, 11, generator=gen) > 0.25
    h64, old64, adv64 = hidden.double(), old_logp.double(), adv.double()

    z = dk.token_sketch(hidden, old_logp, sketch_dim=16, backend="cpp")
    assert rel(z, dk.token_sketch(h64, old64, sketch_dim=16, backend="torch")) < 1e-5

    res = dk.delta_coefficients(hidden, old_logp, adv, mask, k=1, backend="cpp")
    ref = dk.delta_coefficients(h64, old64, adv64, mask, k=1, backend="torch")
    assert rel(res.coef, ref.coef) < 1e-5

    step = 0.2 * torch.randn(3, 11, generator=gen)
    logp = (old_logp + step).clamp_max(-1e-4).requires_grad_()
    logp64 = logp.detach().double().requires_grad_()
    loss, _ = dk.clipped_surrogate_loss(logp, old_logp, adv, mask, coef=res.coef, backend="cpp")
    loss64, _ = dk.clipped_surrogate_loss(logp64, old64, adv64, mask, coef=ref.coef, backend="torch")
    loss.backward()
    loss64.backward()
    assert rel(loss.detach(), loss64.detach()) < 1e-5 and rel(logp.grad, logp64.grad) < 1e-5
    print(f"wheel smoke test ok: delta_kernels {dk.__version__} from {Path(dk.__file__).parent}, backends {backends}")


if __name__ == "__main__":
    main()
