"""Worker for test_distributed.py: one rank of a gloo group computing on its shard.

Run as ``python dist_worker.py RANK WORLD INIT_FILE CASE_FILE OUT_FILE BACKEND``. The case
file holds the full batch and the shard boundaries and (k, sketch_dim) configs; the worker saves its results per config.
"""
import sys

import torch
import torch.distributed as dist

import delta_kernels as dk


def join(rank, world, init_file, case_file):
    """Join the gloo group -> (rank, the case, this rank's shard: hidden, logp, advantages, mask)."""
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    case = torch.load(case_file)
    lo, hi = case["bounds"][rank], case["bounds"][rank + 1]
    return rank, case, tuple(case[k][lo:hi] for k in ("hidden", "logp", "advantages", "mask"))


def main():
    out_file, backend = sys.argv[5:7]
    _, case, (h, logp, adv, mask) = join(*sys.argv[1:5])
    outs = []
    for k, sketch_dim in case["configs"]:
        res = dk.delta_coefficients(h, logp, adv, mask, k=k, sketch_dim=sketch_dim, process_group=dist.group.WORLD,
                                    backend=backend)
        outs.append({"coef": res.coef, "gamma": torch.stack([res.stats.gamma_pos, res.stats.gamma_neg]),
                     "mu_pos": res.stats.mu_pos, "n_valid": res.stats.n_valid})
    torch.save(outs, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
