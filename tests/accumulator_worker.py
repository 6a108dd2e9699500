"""Worker for test_accumulator_distributed.py: one rank of a gloo group adding its shard of the
batch in micro-batches to a DeltaAccumulator with the group.

Run as ``python accumulator_worker.py RANK WORLD INIT_FILE CASE_FILE OUT_FILE``. The case file
holds the batch, the shard bounds and the runs (each: backend, dtype, k, sketch_dim, whether the
advantages come at add, and every rank's micro-batch boundaries inside its shard).
"""
import sys

import torch
import torch.distributed as dist

import delta_kernels as dk
from dist_worker import join


def main():
    out_file = sys.argv[5]
    rank, case, (h, logp, adv, mask) = join(*sys.argv[1:5])
    outs = []
    for run in case["runs"]:
        acc = dk.DeltaAccumulator(k=run["k"], sketch_dim=run["sketch_dim"], store=run["store"],
                                  process_group=dist.group.WORLD, backend=run["backend"])
        cuts = run["cuts"][rank]
        dtype = run["dtype"]
        for a, b in zip(cuts[:-1], cuts[1:]):
            acc.add(h[a:b].to(dtype), logp[a:b].to(dtype), mask[a:b],
                    advantages=adv[a:b].to(dtype) if run["early"] else None)
        res = acc.finalize(None if run["early"] else adv.to(dtype))
        outs.append({"coef": torch.cat([r.coef for r in res]),
                     "gamma": torch.stack([res[0].stats.gamma_pos, res[0].stats.gamma_neg])})
    torch.save(outs, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
