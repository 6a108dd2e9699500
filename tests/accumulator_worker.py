"""Worker for test_accumulator_distributed.py: one rank of a gloo group adding its shard of the
batch in micro-batches to a DeltaAccumulator with the group.

Run as ``python accumulator_worker.py RANK WORLD INIT_FILE CASE_FILE OUT_FILE``. The case file
holds the batch, the shard bounds and the runs (each: backend, k, sketch_dim, whether the
advantages come at add, and every rank's micro-batch boundaries inside its shard).
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
    h, logp, adv, mask = (case[k][lo:hi] for k in ("hidden", "logp", "advantages", "mask"))
    outs = []
    for run in case["runs"]:
        acc = dk.DeltaAccumulator(k=run["k"], sketch_dim=run["sketch_dim"], store=run["store"],
                                  process_group=dist.group.WORLD, backend=run["backend"])
        cuts = run["cuts"][rank]
        dtype = torch.float64 if run["backend"] == "torch" else torch.float32
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
