"""Worker of tests/test_adversarial_above_dist.py: one rank of a gloo group of 2 processes.

Each rank wraps the same float64 model in ``DistributedDataParallel`` and estimates on its own
shard (rank 0: batches of 3 and 2 samples, rank 1: one batch of 3); it saves what it read."""

from __future__ import annotations

import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import fimfast

REPS = ("kfac", "ekfac", "quasi_diag", "dense", "block_diag", "low_rank")


def model_and_shards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, {0: [(x[0:3], y[0:3]), (x[3:5], y[3:5])], 1: [(x[5:8], y[5:8])]}


def run(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, sh = model_and_shards()
    ddp = DDP(model)
    out = {}
    for fim_type in ("exact", "empirical"):
        for reduction in ("sum", "mean"):
            est = fimfast.DiagFisher(ddp, fim_type, reduction=reduction)
            for b in sh[rank]:
                est.step(b)
            F = est.result()
            out[f"diag/{fim_type}/{reduction}"] = (list(F), F.to_vector(), F.meta["count"])
            for rep in REPS:
                S = fimfast.fisher(ddp, sh[rank], fim_type, rep, reduction)
                out[f"{rep}/{fim_type}/{reduction}"] = (list(S.names), S.to_dense(),
                                                         S.meta["count"])
    # distributed="none": this rank's shard only, for the diagonal too
    for rep in ("diag", "kfac"):
        out[f"local/{rep}"] = fimfast.fisher(ddp, sh[rank], "exact", rep, "sum",
                                             distributed="none").to_vector() \
            if rep == "diag" else fimfast.fisher(ddp, sh[rank], "exact", rep, "sum",
                                                 distributed="none").to_dense()
    return out


def main() -> None:
    outdir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    try:
        results = run(rank)
    except Exception:
        results = "error: " + traceback.format_exc()
    dist.barrier()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
