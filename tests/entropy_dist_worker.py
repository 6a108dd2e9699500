"""Worker for test_entropy_mask.py: one rank of a gloo group computing entropy_mask on its shard.

Run as ``python entropy_dist_worker.py RANK WORLD INIT_FILE CASE_FILE OUT_FILE``: the case file
holds the full batches, the shard boundaries and the top_quantile values.
"""
import sys

import torch
import torch.distributed as dist

import delta_kernels as dk


def main():
    rank, world, init_file, case_file, out_file = sys.argv[1:6]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    case = torch.load(case_file)
    lo, hi = case["bounds"][rank], case["bounds"][rank + 1]
    outs = [[dk.entropy_mask(ent[lo:hi], mask[lo:hi], top_quantile=q, process_group=dist.group.WORLD)
             for q in case["quantiles"]] for ent, mask in case["batches"]]
    torch.save(outs, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
