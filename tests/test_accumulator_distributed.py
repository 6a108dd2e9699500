"""DeltaAccumulator with a process group: each rank adds its shard in random micro-batches and
gets the coefficients of one delta_coefficients call over the whole batch."""
import os

import pytest
import torch

import delta_kernels as dk
from backend_cases import cpu_backend_params
from helpers import TOL, assert_rel, make_batch, run_gloo_ranks

WORKER = os.path.join(os.path.dirname(__file__), "accumulator_worker.py")
# the registry's backends on CPU tensors here, but the interpreter (too slow in every rank)
# (name, dtype): float64 where the backend computes in it
COMPILED = [(str(ut), torch.float64 if torch.float64 in ut.declaration.dtypes else torch.float32)
            for ut, marks in ((p.values[0], p.marks) for p in cpu_backend_params()) if not marks and not ut.interpreted]


def random_cuts(n_rows: int, g: torch.Generator):
    """Micro-batch boundaries 0 = c0 < c1 < ... = n_rows, drawn at random (sizes 1..n_rows)."""
    inner = sorted(set(torch.randint(1, max(n_rows, 2), (int(torch.randint(0, n_rows, (1,), generator=g)),),
                                     generator=g).tolist()) - {n_rows}) if n_rows > 1 else []
    return [0] + inner + [n_rows]


@pytest.mark.parametrize("bounds", [[0, 5, 12], [0, 3, 4, 12]], ids=["2ranks", "3ranks"])
def test_ranks_with_random_micro_batches_match_one_call(tmp_path, bounds):
    world = len(bounds) - 1
    h, logp, adv, mask = make_batch(12, 5, 10, seed=world)
    g = torch.Generator().manual_seed(world)
    runs = []
    for backend, dtype in COMPILED:
        for k, sketch_dim, early, store in ((0, None, False, "device"), (1, 6, True, "host"), (2, None, True, "host"),
                                            (3, 6, False, "device")):
            cuts = [random_cuts(bounds[r + 1] - bounds[r], g) for r in range(world)]
            runs.append(dict(backend=backend, dtype=dtype, k=k, sketch_dim=sketch_dim, early=early, store=store,
                             cuts=cuts))
    per_rank = run_gloo_ranks(WORKER, world, tmp_path,
                              dict(hidden=h, logp=logp, advantages=adv, mask=mask, bounds=bounds, runs=runs))
    for i, run in enumerate(runs):
        dtype = run["dtype"]
        one = dk.delta_coefficients(h.to(dtype), logp.to(dtype), adv.to(dtype), mask, k=run["k"],
                                    sketch_dim=run["sketch_dim"], backend=run["backend"])
        tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
        assert_rel(torch.cat([o[i]["coef"] for o in per_rank]), one.coef, tol, f"run {run}")
        for o in per_rank:
            assert_rel(o[i]["gamma"], torch.stack([one.stats.gamma_pos, one.stats.gamma_neg]), tol * 10, "gamma")
