"""entropy_mask against TRL 1.16's own GRPOTrainer.get_high_entropy_mask (called for real as
the oracle): random and tied entropies, padding, 1/2/3 gloo ranks (each rank's shard against
TRL's function on the whole batch, which is what its gather computes), inputs past torch.quantile's
2^24-element limit, and the bad inputs."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import delta_kernels as dk
from helpers import run_gloo_ranks

trl = pytest.importorskip("trl")
WORKER = os.path.join(os.path.dirname(__file__), "entropy_dist_worker.py")
QUANTILES = (0.2, 0.5, 0.37, 1.0)


@pytest.fixture(scope="module")
def trl_mask():
    """TRL's get_high_entropy_mask(entropies, mask, 1 - top_quantile) on one process."""
    from accelerate import Accelerator
    host = SimpleNamespace(accelerator=Accelerator(cpu=True))
    return lambda ent, mask, q: trl.GRPOTrainer.get_high_entropy_mask(host, ent, mask, 1 - q)


def batch(rows, cols, seed, tied=False):
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(rows, cols, generator=g) * 3
    if tied:  # few distinct values: the threshold falls on ties
        ent = torch.randint(0, 4, (rows, cols), generator=g).float() * 0.5
    mask = (torch.rand(rows, cols, generator=g) > 0.25).long()
    return ent.masked_fill(mask == 0, 7.0), mask  # padding above every valid entropy: must not count


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("q", QUANTILES)
def test_equals_trl_on_one_process(trl_mask, q, tied):
    for seed, (rows, cols) in enumerate([(6, 11), (1, 1), (9, 40)]):
        ent, mask = batch(rows, cols, seed, tied)
        out = dk.entropy_mask(ent, mask, top_quantile=q)
        assert out.dtype == torch.bool and torch.equal(out, trl_mask(ent, mask, q)), (seed, q)


def test_no_valid_token_keeps_nothing(trl_mask):
    ent, mask = torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.long)
    assert torch.equal(dk.entropy_mask(ent, mask), trl_mask(ent, mask, 0.2))
    assert not bool(dk.entropy_mask(ent, mask).any())


def test_bfloat16_entropies_compare_as_trl_does(trl_mask):
    ent, mask = batch(5, 13, 3)
    ent = ent.bfloat16()
    assert torch.equal(dk.entropy_mask(ent, mask, top_quantile=0.3), trl_mask(ent, mask, 0.3))


@pytest.mark.parametrize("world,bounds", [(1, [0, 12]), (2, [0, 5, 12]), (3, [0, 2, 2, 12])])
def test_gloo_ranks_equal_trl_on_the_whole_batch(tmp_path, trl_mask, world, bounds):
    """Random and tied entropies; rank 1 of the 3-rank case holds no rows: it still joins the gather."""
    batches = [batch(12, 9, 11, tied) for tied in (False, True)]
    shards = run_gloo_ranks(WORKER, world, tmp_path, dict(batches=batches, bounds=bounds, quantiles=QUANTILES))
    for b, (ent, mask) in enumerate(batches):
        for i, q in enumerate(QUANTILES):
            assert torch.equal(torch.cat([s[b][i] for s in shards]), trl_mask(ent, mask, q)), (b, q)


def test_past_the_2_pow_24_limit_of_torch_quantile():
    """2^24 + 3 valid tokens: torch.quantile (so TRL's function) refuses them up to torch 2.13 (2.14
    lifts the limit: then its threshold must agree too); the selection gives the linear-interpolation
    quantile of the sorted values."""
    n = 2**24 + 3
    ent = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, n, dtype=torch.bool)
    q = 0.8
    try:
        torch_thr = torch.quantile(ent[0], q)
    except RuntimeError as e:
        assert "too large" in str(e)
        torch_thr = None
    out = dk.entropy_mask(ent, mask, top_quantile=1 - q)
    s = ent[0].sort().values
    rank = torch.tensor(q, dtype=torch.float32) * (n - 1)
    lo = int(rank)
    thr = torch.lerp(s[lo], s[min(lo + 1, n - 1)], rank - lo)
    assert torch.equal(out, ent >= thr)
    if torch_thr is not None:
        assert torch.equal(out, ent >= torch_thr)
    assert abs(float(out.float().mean()) - (1 - q)) < 1e-6


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_top_quantile_is_refused(bad):
    with pytest.raises(ValueError, match=r"^top_quantile: must be in \(0, 1\]") as e:
        dk.entropy_mask(torch.rand(2, 3), torch.ones(2, 3), top_quantile=bad)
    assert "\n" not in str(e.value)


def test_non_finite_entropy_at_a_valid_position_is_refused():
    ent = torch.rand(2, 3)
    ent[1, 1] = float("nan")
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"^entropy: non-finite value nan at index \[1, 1\]$"):
        dk.entropy_mask(ent, mask)
    mask[1, 1] = 0  # padding is not read
    assert not bool(dk.entropy_mask(ent, mask)[1, 1])


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="^mask: shape"):
        dk.entropy_mask(torch.rand(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize("tied", [False, True])
def test_compiled_threshold_equals_trl(trl_mask, tied):
    """Under torch.compile the order statistics come from one sort with no host read (padding
    pushed to +inf, ranks as tensors): the same mask as TRL's, no valid token and bfloat16 included."""
    torch._dynamo.reset()
    call = torch.compile(lambda e, m, q: dk.entropy_mask(e, m, top_quantile=q), fullgraph=True, backend="eager")
    empty = (torch.rand(3, 4), torch.zeros(3, 4, dtype=torch.long))
    for ent, mask in [batch(9, 40, 5, tied), batch(1, 1, 6, tied), empty, (batch(5, 13, 3, tied)[0].bfloat16(),
                                                                          batch(5, 13, 3, tied)[1])]:
        for q in QUANTILES:
            assert torch.equal(call(ent, mask, q), trl_mask(ent, mask, q)), (tuple(ent.shape), q)
    torch._dynamo.reset()
