"""The triton backend's fused delta_coefficients (delta_kernels/triton/fused.py): launches per
call counted on the CPU (Triton kernels under the interpreter plus torch ops), without and with a
(one-rank gloo) process group, no host sync, the
GPU's code paths at forced small tiles against the float64 reference and the unfused pipeline,
bitwise repeatability, and CUDA-graph capture (on a GPU)."""
from __future__ import annotations

import importlib

import pytest
import torch

import delta_kernels as dk
from delta_kernels._alloc import poisoned
from helpers import TOL, as64, assert_rel, make_batch
from launch_counter import LaunchCounter

triton_backend = pytest.importorskip("delta_kernels.triton")
fused = importlib.import_module("delta_kernels.triton.fused")
row_partials = importlib.import_module("delta_kernels.triton.row_partials")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SOURCES = ("exact", "sketch", "vectors", "vectors+sums")


def _inputs(source, n_seq=3, seq_len=37, hidden=40, seed=0, dtype=torch.float32):
    """(args, kwargs) of one delta_coefficients call from ``source``, fresh random values."""
    h, lp, adv, mask = make_batch(n_seq, seq_len, hidden, dtype=dtype, seed=seed, seq_level=False, device=DEVICE)
    h, lp, adv, mask = h.reshape(-1, hidden), lp.reshape(-1), adv.reshape(-1), mask.reshape(-1)
    if source == "exact":
        return (h, lp, adv, mask), {}
    if source == "sketch":
        return (h, lp, adv, mask), dict(sketch_dim=24, seed=seed)
    v = dk.token_sketch(h, lp, backend="torch")
    kw = dict(vectors=v)
    if source == "vectors+sums":
        a = adv.double() * mask
        kw["side_sums"] = torch.stack([a.clamp_min(0) @ v.double(), (-a).clamp_min(0) @ v.double()]).float()
    return (None, lp, adv, mask), kw


def _reference(args, kw, k):
    """The float64 reference on the same inputs."""
    args64 = tuple(None if a is None else (a.double() if a.is_floating_point() else a) for a in args)
    kw64 = {key: (val.double() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    return dk.delta_coefficients(*args64, k=k, backend="torch", **kw64)


def _count(args, kw, k):
    with poisoned(False):  # the poison fill is a test-only launch
        dk.delta_coefficients(*args, k=k, backend="triton", check_values=False, **kw)  # warm: compile
        with LaunchCounter() as lc:
            dk.delta_coefficients(*args, k=k, backend="triton", check_values=False, **kw)
    return lc


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_launches_per_call(source, k):
    """At most 2k + 6 device launches (8 for exact k = 1), all of them Triton kernels: no torch
    op, so no host sync either, on flat inputs with a bool mask."""
    args, kw = _inputs(source)
    lc = _count(args, kw, k)
    assert lc.launches <= 2 * k + 6, lc.ops
    if source == "exact" and k == 1:
        assert lc.launches <= 8, lc.ops
    assert all(name.startswith("triton:") for name in lc.ops), lc.ops


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """torch.distributed.group.WORLD of one gloo rank (a file store in a tmp dir)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_launches_per_call_with_group(monkeypatch, one_rank_group, source, k):
    """With a process group the call stays fused: at most 2k + 6 Triton kernels besides one local
    sum per reduction point (_local_sums_kernel, k + 3; 2 when k = 0) and 2k + 4 all_reduce calls
    (each with group_sum's copy of its buffer, the only torch ops). On one rank it gives bitwise
    the same results as the call without a group."""
    import torch.distributed as dist
    calls = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **kw: (calls.append(t.numel()), all_reduce(t, *a, **kw))[1])
    args, kw = _inputs(source, seed=20 + k)
    kw = dict(kw, process_group=one_rank_group)
    lc = _count(args, kw, k)
    n_reduce = len(calls) // 2  # the warm-up call and the counted one
    assert n_reduce == 2 * k + 4, calls
    local = lc.ops.pop("triton:_local_sums_kernel", 0)
    assert local == (2 if k == 0 else k + 3), lc.ops
    copies = lc.ops.pop("aten.clone.default", 0)
    collectives = {name: c for name, c in lc.ops.items() if name.startswith("c10d")}
    assert copies <= n_reduce and sum(collectives.values()) <= n_reduce, lc.ops
    kernels = {name: c for name, c in lc.ops.items() if name not in collectives}
    assert all(name.startswith("triton:") for name in kernels) and sum(kernels.values()) <= 2 * k + 6, lc.ops
    grouped = dk.delta_coefficients(*args, k=k, backend="triton", **kw)
    alone = dk.delta_coefficients(*args, k=k, backend="triton", **dict(kw, process_group=None))
    for name in ("coef", "weighted_advantages"):
        assert torch.equal(getattr(grouped, name), getattr(alone, name)), name
    for name in ("mu_pos", "mu_neg", "W", "b", "gamma_pos", "gamma_neg", "scale", "n_pos", "n_neg", "n_valid"):
        assert torch.equal(getattr(grouped.stats, name), getattr(alone.stats, name)), name


def test_launches_per_call_with_batch_shapes():
    """[B, T] inputs with one advantage per sequence and a 0/1 float mask: the two conversions
    (the broadcast advantages, the bool mask) are the only torch ops, and neither syncs."""
    h, lp, adv, mask = make_batch(3, 11, 16, seed=3, device=DEVICE)
    lc = _count((h, lp, adv, mask.float()), {}, 1)
    torch_ops = {n: c for n, c in lc.ops.items() if not n.startswith("triton:")}
    assert sum(torch_ops.values()) <= 2 and "aten._local_scalar_dense.default" not in torch_ops, lc.ops
    assert lc.launches <= 10, lc.ops


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("k", [0, 2])
def test_small_tiles_match_reference_and_unfused(monkeypatch, source, k):
    """The fused call at forced small tiles (several row groups per finalize tile, several row
    tiles per [N] walk, several column tiles, multi-tile row groups): the GPU's code paths, set at
    call time. Against float64, and against the unfused pipeline on the same kernels."""
    monkeypatch.setattr(row_partials, "MAX_GROUPS", 5)
    small = dict(BLOCK_G=2, BLOCK_R=16, BLOCK_C=16, BLOCK_D=16)
    for config in (fused.CENTROIDS, fused.TEMPERATURES, fused.COEFFICIENTS, fused.SUM_PARTIALS):  # read at call time
        for key in small.keys() & config.keys():
            monkeypatch.setitem(config, key, small[key])
    args, kw = _inputs(source, seed=5 + k)
    out = dk.delta_coefficients(*args, k=k, backend="triton", **kw)
    ref = _reference(args, kw, k)
    tol = TOL[torch.float32]
    for name in ("coef", "weighted_advantages"):
        assert_rel(getattr(out, name), getattr(ref, name), tol, name)
    for name in ("mu_pos", "mu_neg", "W", "pred"):
        assert_rel(getattr(out.stats, name), getattr(ref.stats, name), tol, name)
    scalars = ("gamma_pos", "gamma_neg", "scale", "n_pos", "n_neg", "n_valid", "b")
    assert_rel(torch.stack([getattr(out.stats, n).double() for n in scalars]),
               torch.stack([getattr(ref.stats, n).double() for n in scalars]), tol, "scalar stats")
    # the unfused pipeline over the same passes (what a process group and DeltaAccumulator run)
    monkeypatch.setattr(fused, "fused_supported", lambda *a: False)
    unfused = dk.delta_coefficients(*args, k=k, backend="triton", **kw)
    assert_rel(out.coef, unfused.coef, tol, "coef vs unfused")
    assert_rel(out.stats.pred, unfused.stats.pred, tol, "pred vs unfused")


def test_bitwise_repeatable_and_padding_dont_care():
    """Two calls agree bit for bit; NaN hidden states and garbage log-probs at padding change nothing."""
    (h, lp, adv, mask), _ = _inputs("exact", seed=8)
    one = dk.delta_coefficients(h, lp, adv, mask, k=2, backend="triton")
    two = dk.delta_coefficients(h, lp, adv, mask, k=2, backend="triton")
    for a, b in ((one.coef, two.coef), (one.stats.W, two.stats.W), (one.stats.gamma_pos, two.stats.gamma_pos)):
        assert torch.equal(a, b)
    h2, lp2, adv2 = h.clone(), lp.clone(), adv.clone()
    h2[~mask] = float("nan")
    lp2[~mask] = 5.0
    adv2[~mask] = 1e30
    dirty = dk.delta_coefficients(h2, lp2, adv2, mask, k=2, backend="triton", check_values=False)
    assert torch.equal(dirty.coef, one.coef) and torch.equal(dirty.stats.mu_pos, one.stats.mu_pos)


def test_degenerate_sides():
    """No negative token, and no valid token at all: the reference's rules (empty side, coef 1 /
    0 at padding)."""
    (h, lp, adv, mask), _ = _inputs("exact", seed=9)
    for a, m in ((adv.abs() + 0.1, mask), (adv, torch.zeros_like(mask))):
        out = dk.delta_coefficients(h, lp, a, m, k=1, backend="triton")
        ref = dk.delta_coefficients(*as64(h, lp, a), m, k=1, backend="torch")
        assert_rel(out.coef, ref.coef, TOL[torch.float32], "coef")
        assert_rel(out.stats.mu_neg, ref.stats.mu_neg, TOL[torch.float32], "mu_neg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sketch_dim", [None, 64])
def test_cuda_graph_capture(sketch_dim):
    """The recipe of docs/cuda_graphs.md: static inputs, warm up on a side stream, capture one
    call with check_values=False, replay after copying new values in: equals an eager call."""
    (h, lp, adv, mask), _ = _inputs("exact", n_seq=4, seq_len=300, hidden=256, seed=10)
    kw = dict(k=1, sketch_dim=sketch_dim, backend="triton", check_values=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            dk.delta_coefficients(h, lp, adv, mask, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = dk.delta_coefficients(h, lp, adv, mask, **kw)
    (h2, lp2, adv2, mask2), _ = _inputs("exact", n_seq=4, seq_len=300, hidden=256, seed=11)
    for dst, src in ((h, h2), (lp, lp2), (adv, adv2), (mask, mask2)):
        dst.copy_(src)
    graph.replay()
    eager = dk.delta_coefficients(h2, lp2, adv2, mask2, **kw)
    torch.cuda.synchronize()
    assert torch.equal(static.coef, eager.coef) and torch.equal(static.stats.W, eager.stats.W)


@pytest.mark.parametrize("source", ["exact", "vectors"])
def test_gpu_row_tiles(monkeypatch, source):
    """The GPU's whole-row tiles (one row per tile, the 2-stage row loop) against float64."""
    monkeypatch.setattr(importlib.import_module("delta_kernels.triton.pass3_margins"), "ROWS_PER_TILE", 1)
    args, kw = _inputs(source, n_seq=2, seq_len=9, seed=12)
    out = dk.delta_coefficients(*args, k=1, backend="triton", **kw)
    ref = _reference(args, kw, 1)
    assert_rel(out.coef, ref.coef, TOL[torch.float32], "coef")
    assert_rel(out.stats.W, ref.stats.W, TOL[torch.float32], "W")
