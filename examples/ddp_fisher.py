"""Diagonal Fisher of a DistributedDataParallel model, each rank on its shard of the data.

Run on CPU with two processes (gloo backend)::

    torchrun --nproc_per_node 2 examples/ddp_fisher.py

or as one process (``python examples/ddp_fisher.py``): the same code, nothing to reduce. Every rank
trains on its shard with ``train_step`` (one forward: the training gradients, all-reduced by DDP as
usual, and a HUTCHINSON estimate), then measures EXACT and HUTCHINSON on held-out batches with
``step`` (no DDP communication at all). ``result()`` sums states and counts over the ranks, so
every rank prints the estimate over the union of the shards.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fimfast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None, help="save the EXACT estimate (rank 0) to this file")
    args = ap.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")  # "nccl" on GPUs
    run(args, distributed)
    if distributed:
        # Everything that holds the group (the DDP model, the estimators) was freed with run()'s
        # frame; a gloo group destroyed while one is still alive, or by a rank still running,
        # can abort the process at exit. So: free, wait for every rank, then destroy.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def run(args: argparse.Namespace, distributed: bool) -> None:
    """Train on this rank's shard with the Fisher along the way, then measure and print it."""
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same data and initial weights on every rank
    x = torch.randn(args.samples, 20)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5:10].sum(1) > 1).long()  # 3 classes
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(data, args.batch_size, sampler=sampler, shuffle=sampler is None)

    net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    model = DDP(net) if distributed else net
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    # training: the Fisher along the way (EMA over batches, reduced over ranks when read)
    running = fimfast.DiagFisher(model, "hutchinson", reduction="mean", ema=0.9)
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = running.train_step(batch)  # DDP all-reduces the training gradients once
            opt.step()
        if rank == 0:
            print(f"epoch {epoch}: last loss {loss.item():.4f}")

    # measurement: EXACT and HUTCHINSON over this rank's shard, then summed over the ranks
    exact = fimfast.DiagFisher(model, "exact", reduction="mean")
    hutch = fimfast.DiagFisher(model, "hutchinson", reduction="mean", num_probes=4)
    for batch in loader:
        exact.step(batch)  # no DDP machinery, no communication
        hutch.step(batch)
    F_exact = exact.result()  # collective: every rank calls it
    F_hutch = hutch.result()
    F_run = running.result()
    if rank == 0:
        rel = (F_hutch.to_vector() - F_exact.to_vector()).norm() / F_exact.to_vector().norm()
        print(f"ranks: {world}, rows: {F_exact.meta['count']} (the union of the shards)")
        print(
            f"trace EXACT {F_exact.trace():.5f}, HUTCHINSON (4 probes) {F_hutch.trace():.5f}, "
            f"relative L2 gap {rel:.3f}"
        )
        print(f"trace of the training-time EMA estimate: {F_run.trace():.5f}")
        for name, row in F_exact.per_layer().items():
            print(f"  {name:>20s}  trace {row['trace']:.5f}  max {row['max']:.2e}")
        if args.out:
            F_exact.save(args.out)
            print(f"saved {args.out}")


if __name__ == "__main__":
    main()
