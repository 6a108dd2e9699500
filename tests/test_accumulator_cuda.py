"""DeltaAccumulator on a GPU: host mode (pinned copies, side-stream prefetch) gives the device
mode's bits, stays within two micro-batches of device memory, and store="auto" spills past its
budget. Needs a GPU."""
import pytest
import torch

import delta_kernels as dk
import delta_kernels.accumulator as accumulator
from backend_cases import gpu_backend_params
from helpers import TOL, assert_rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def micro_batch(i, rows, seq, width, dtype):
    """Micro-batch i drawn on the device (as an old-log-prob pass hands it over)."""
    g = torch.Generator(device="cuda").manual_seed(i)
    h = torch.randn(rows, seq, width, generator=g, device="cuda", dtype=dtype).add_(0.5)
    logp = -torch.rand(rows, seq, generator=g, device="cuda") * 3 - 1e-3
    adv = torch.randn(rows, generator=g, device="cuda")
    mask = torch.rand(rows, seq, generator=g, device="cuda") > 0.2
    return h, logp, adv, mask


def run(store, backend, n_adds=6, rows=2, seq=64, width=256, dtype=torch.bfloat16, sketch_dim=None, early=False):
    acc = dk.DeltaAccumulator(k=2, store=store, backend=backend, sketch_dim=sketch_dim)
    advs = []
    for i in range(n_adds):
        h, logp, adv, mask = micro_batch(i, rows, seq, width, dtype)
        acc.add(h, logp, mask, advantages=adv if early else None)
        advs.append(adv)
    return acc.finalize(None if early else advs)


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("early", [False, True])
def test_host_mode_gives_device_mode_bits_and_one_call_numbers(backend, early):
    dev = run("device", backend, early=early)
    host = run("host", backend, early=early)
    for d, h in zip(dev, host):
        assert torch.equal(d.coef, h.coef)
    parts = [micro_batch(i, 2, 64, 256, torch.bfloat16) for i in range(6)]
    h, logp, adv, mask = (torch.cat([p[j] for p in parts]) for j in range(4))
    one = dk.delta_coefficients(h.double(), logp.double(), adv.double(), mask, k=2, backend="torch")
    assert_rel(torch.cat([r.coef for r in host]), one.coef, TOL[torch.float32], "coef")


def test_host_mode_peak_device_memory_is_two_micro_batches():
    rows, seq, width, n_adds = 4, 1024, 1024, 8
    mb_bytes = rows * seq * width * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run("host", "triton", n_adds=n_adds, rows=rows, seq=seq, width=width)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    n_tokens = n_adds * rows * seq
    # two micro-batches (the one drawn next to the one just added; in finalize the chunk in use and
    # the one prefetched), O(N) per-token arrays, the kernels' [G, 2, D] partials
    assert extra < 3 * mb_bytes + 128 * n_tokens + 8 * 2**20, (extra, mb_bytes)


def test_auto_spills_to_host_past_the_budget(monkeypatch):
    dev = run("device", "triton")
    monkeypatch.setattr(accumulator, "DEVICE_BUDGET_FRACTION", 1e-9)
    spilled = run("auto", "triton")
    for d, s in zip(dev, spilled):
        assert torch.equal(d.coef, s.coef)


def test_device_change_between_adds_is_refused_naming_the_add():
    acc = dk.DeltaAccumulator(k=1)
    h, logp, adv, mask = micro_batch(0, 2, 8, 16, torch.float32)
    acc.add(h, logp, mask)
    with pytest.raises(ValueError, match="add 1: hidden: device cpu differs"):
        acc.add(h.cpu(), logp.cpu(), mask.cpu())
    acc.add(h, logp, mask)  # the refused add left the accumulator usable
    assert len(acc.finalize([adv, adv])) == 2
