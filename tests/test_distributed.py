"""Global statistics over torch.distributed: each rank gets the single-process answer."""
import os

import pytest
import torch

import delta_kernels as dk
from helpers import TOL, assert_rel, make_batch, run_gloo_ranks

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def fast_backends():
    out = ["torch"]
    try:
        from delta_kernels.backends import cpp
        if hasattr(cpp, "delta_coefficients"):
            out.append("cpp")
    except ImportError:
        pass
    try:  # the fused call with its per-reduction-point all_reduce (interpreted on a CPU: TRITON_INTERPRET
        import delta_kernels.triton  # noqa: F401  # is in the environment the ranks inherit, see conftest.py)
        out.append("triton")
    except ImportError:
        pass
    return out


def run_ranks(tmp_path, case, backend):
    return run_gloo_ranks(WORKER, len(case["bounds"]) - 1, tmp_path, case, backend)

CASES = {
    # name: (world size, shard bounds over 12 sequences, how to edit the batch)
    "two_unequal": (2, [0, 3, 12], None),
    "three_one_side_rank": (3, [0, 4, 5, 12], "rank1_positive_only"),
    "three_masked_rank": (3, [0, 2, 7, 12], "rank2_fully_masked"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", fast_backends())
def test_ranks_match_single_process(tmp_path, name, backend):
    world, bounds, edit = CASES[name]
    h, logp, adv, mask = make_batch(12, 6, 16, seed=hash(name) % 1000)
    if edit == "rank1_positive_only":
        adv[bounds[1]:bounds[2]] = adv[bounds[1]:bounds[2]].abs() + 0.1
    if edit == "rank2_fully_masked":
        mask[bounds[2]:] = False
    configs = [(0, None), (1, None), (2, 8)]
    case = dict(hidden=h, logp=logp, advantages=adv, mask=mask, bounds=bounds, configs=configs)
    per_rank = run_ranks(tmp_path, case, backend)
    for i, (k, sketch_dim) in enumerate(configs):
        outs = [r[i] for r in per_rank]
        ref = dk.delta_coefficients(h.double(), logp.double(), adv.double(), mask, k=k, sketch_dim=sketch_dim,
                                    backend="torch")
        got = torch.cat([o["coef"] for o in outs])
        assert_rel(got, ref.coef, TOL[torch.float32], f"{name} k={k} coef")
        for o in outs:
            assert_rel(o["gamma"], torch.stack([ref.stats.gamma_pos, ref.stats.gamma_neg]), TOL[torch.float32], "gamma")
            assert_rel(o["mu_pos"], ref.stats.mu_pos, TOL[torch.float32], "mu_pos")
            assert o["n_valid"].item() == mask.sum().item()


def test_without_group_statistics_are_per_call():
    h, logp, adv, mask = make_batch(8, 5, 6, seed=3)
    whole = dk.delta_coefficients(h, logp, adv, mask, backend="torch").coef
    half = dk.delta_coefficients(h[:4], logp[:4], adv[:4], mask[:4], backend="torch").coef
    assert not torch.allclose(half, whole[:4])
