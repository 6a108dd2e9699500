"""Strides, not copies: a response slice hidden_full[:, p:] of [B, S, H] hidden states (strides
(S H, H, 1)) is read in place by a backend that declares strided_rows (delta_kernels/_backends.py),
with results equal bit for bit to the call on a contiguous copy, and no [N, H] tensor allocated.

Allocations are seen by a TorchDispatchMode: every aten op's outputs (torch.empty of a kernel's
output, a .contiguous() or reshape copy, a temporary of a torch op) pass through it. A backend
that does not declare strided_rows gets a contiguous copy (_checks.rows_for): its case is an
xfail (strict) keyed on the flag, so it turns into a failure to look at when the flag is flipped
without the kernels reading views (or passes once both are done).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import delta_kernels as dk
from backend_cases import backend_params
from helpers import assert_rel, make_batch

B, S, P, H = 3, 13, 4, 256  # response slice [:, P:] of [B, S, H]: T = 9, N = 27 tokens
R = 8                       # sketch_dim: [N, R] outputs stay far below N * H elements


def _params(op):
    out = []
    for p in backend_params(op):
        ut = p.values[0]
        marks = list(p.marks)
        if not ut.declaration.strided_rows:
            marks.append(pytest.mark.xfail(strict=True, reason=f"{ut} declares strided_rows=False: "
                                                               "the gate hands it a contiguous [N, H] copy"))
        out.append(pytest.param(ut, id=str(ut), marks=marks))
    return out


def _storages(tree):
    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


class Allocations(TorchDispatchMode):
    """Records the element count of every tensor an aten op returns in memory of its own (views and
    in-place results, which share an input's storage, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages((args, kwargs))
        self.numels += [t.numel() for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out

    def big(self, n_tokens: int, width: int):
        return [n for n in self.numels if n >= n_tokens * width]


def strided(layout: str, seed: int, dtype, backend):
    """(view, logp, advantages, mask) of fresh random data: the hidden-state view is
    "batched" hidden_full[:, P:] ([B, T, H], logp [B, T]), "interleaved" the same slice of a
    time-major tensor (stride_b H < stride_t B H) or "rows" wide[:, :H] ([N, H] rows of a wider
    [N, H + 40] matrix, logp [N])."""
    full, logp, adv, mask = make_batch(B, S, H, dtype=dtype, seed=seed, device=backend.device, seq_level=False)
    if layout == "interleaved":
        full = full.transpose(0, 1).contiguous().transpose(0, 1)
    if layout in ("batched", "interleaved"):
        view, logp, adv, mask = full[:, P:], logp[:, P:], adv[:, P:], mask[:, P:]
    else:
        wide = torch.cat([full.reshape(B * S, H), full.reshape(B * S, H)[:, :40]], dim=1)
        view, logp, adv, mask = wide[:, :H], logp.reshape(-1), adv.reshape(-1), mask.reshape(-1)
    assert not view.is_contiguous() and view.stride(-1) == 1
    return view, logp.contiguous(), adv.contiguous(), mask.contiguous()


LAYOUTS = ("batched", "interleaved", "rows")


@pytest.mark.parametrize("backend", _params("delta_coefficients"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("source", ["hidden", "vectors", "sketch"])
def test_delta_coefficients_read_the_view_in_place(backend, layout, source):
    view, logp, adv, mask = strided(layout, 11, torch.bfloat16, backend)
    n = logp.numel()
    kw = dict(k=2, backend=backend, sketch_dim=R if source == "sketch" else None)

    def run(x):
        if source == "vectors":
            return dk.delta_coefficients(None, logp, adv, mask, vectors=x, **kw)
        return dk.delta_coefficients(x, logp, adv, mask, **kw)

    with Allocations() as seen:
        out = run(view)
    assert seen.big(n, H) == [], f"an [N, H] tensor was allocated (N = {n}, H = {H}): {seen.big(n, H)}"
    same = run(view.contiguous())
    for name in ("coef", "weighted_advantages"):
        assert torch.equal(getattr(out, name), getattr(same, name)), f"{name} differs from the contiguous call"
    assert torch.equal(out.stats.pred, same.stats.pred) and torch.equal(out.stats.W, same.stats.W)
    logp, adv = logp.double(), adv.double()
    kw["backend"] = "torch"
    assert_rel(out.coef, run(view.double()).coef, 1e-4, "coef vs the float64 reference")


@pytest.mark.parametrize("backend", _params("token_sketch"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sketch_dim", [None, R])
def test_token_sketch_reads_the_view_in_place(backend, layout, sketch_dim):
    view, logp, _, _ = strided(layout, 12, torch.float16, backend)
    n = logp.numel()
    with Allocations() as seen:
        z = dk.token_sketch(view, logp, sketch_dim=sketch_dim, backend=backend)
    expected = 1 if sketch_dim is None else 0  # exact vectors: the [N, H] output itself
    assert len(seen.big(n, H)) == expected, f"[N, H] allocations {seen.big(n, H)}, expected {expected}"
    assert torch.equal(z, dk.token_sketch(view.contiguous(), logp, sketch_dim=sketch_dim, backend=backend))
    ref = dk.token_sketch(view.double(), logp.double(), sketch_dim=sketch_dim, backend="torch")
    assert_rel(z, ref, 2e-3, "token_sketch vs the float64 reference")


@pytest.mark.parametrize("backend", _params("PIPELINE_KERNELS"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_accumulator_keeps_and_reads_the_views(backend, layout):
    """Two adds of strided views, advantages at finalize (side sums, gated and final passes over the
    stored views): no [N, H] copy at add or finalize, the same bits as contiguous adds."""
    views, logps, advs, masks = zip(*(strided(layout, 20 + i, torch.float32, backend) for i in range(2)))

    def run(xs):
        acc = dk.DeltaAccumulator(k=1, backend=backend, store="device")
        for x, lp, m in zip(xs, logps, masks):
            acc.add(x, lp, m)
        return acc.finalize(list(advs))

    with Allocations() as seen:
        out = run(views)
    assert seen.big(logps[0].numel(), H) == [], f"a micro-batch's [n, H] was copied: {seen.big(logps[0].numel(), H)}"
    same = run([v.contiguous() for v in views])
    for o, s in zip(out, same):
        assert torch.equal(o.coef, s.coef) and torch.equal(o.stats.pred, s.stats.pred)
    ref = dk.delta_coefficients(torch.cat([v.reshape(-1, H) for v in views]).double(),
                                torch.cat([lp.reshape(-1) for lp in logps]).double(),
                                torch.cat([a.reshape(-1) for a in advs]).double(),
                                torch.cat([m.reshape(-1) for m in masks]), k=1, backend="torch")
    assert_rel(torch.cat([o.coef.reshape(-1) for o in out]), ref.coef, 1e-4, "coef vs the float64 reference")


@pytest.mark.parametrize("backend", backend_params("delta_coefficients"))
def test_a_strided_last_dim_is_copied_and_still_exact(backend):
    """A view whose last dim is not contiguous (here a transposed block) is copied once by the gate
    (_checks.rows_for): the kernels read rows as consecutive elements. Same bits as the copy."""
    full, logp, adv, mask = make_batch(2, 5, H, seed=30, device=backend.device, seq_level=False)
    view = full.transpose(0, 2).contiguous().transpose(0, 2)  # [2, 5, H], strides (1, 2, 10)
    assert view.stride(-1) != 1
    a = dk.delta_coefficients(view, logp, adv, mask, backend=backend)
    b = dk.delta_coefficients(view.contiguous(), logp, adv, mask, backend=backend)
    assert torch.equal(a.coef, b.coef)
