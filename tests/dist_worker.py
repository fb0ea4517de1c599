"""One rank of the torch.distributed tests (tests/test_distributed.py), run as a script.

``python tests/dist_worker.py <group> <outdir>`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set: initialises a gloo process group on 127.0.0.1, runs every scenario of the
group and saves ``{scenario: result or "error: ..."}`` to ``<outdir>/rank<r>.pt``. Each scenario's
exception is recorded rather than raised, so one failure leaves the others (and the other rank's
collectives) running; a failed collective would hang, and the launcher's timeout catches that.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import make_case  # noqa: E402

import fimfast  # noqa: E402
from fimfast.structured import FisherAccumulator  # noqa: E402

RANDOM_TYPES = ["hutchinson", "hutchinson_sqrt", "hutchinson_dg", "hutchinson_rankk",
                "hutchinson_rank1", "monte_carlo"]
DRAWS = 48


# ------------------------------------------------------------------------------------------------
# data: the same deterministic cases in every process, split into shards
# ------------------------------------------------------------------------------------------------
def shards(name: str):
    """``(case, {rank: [batches]})``: rank 0 gets two batches, rank 1 one (uneven sizes)."""
    if name == "relu_mlp":
        case = make_case(name, N=8, seed=0)
        x, y = case.batch
        return case, {0: [(x[0:3], y[0:3]), (x[3:5], y[3:5])], 1: [(x[5:8], y[5:8])]}
    case = make_case("token_lm", N=6, seed=0)
    b = case.batch

    def sl(i, j):
        return {k: v[i:j] for k, v in b.items()}

    return case, {0: [sl(0, 2), sl(2, 4)], 1: [sl(4, 6)]}


def equal_shards(name: str = "relu_mlp"):
    """``(case, {rank: batch})`` with 4 samples each (EMA with "mean", DDP gradients)."""
    case = make_case(name, N=8, seed=0)
    x, y = case.batch
    return case, {0: (x[0:4], y[0:4]), 1: (x[4:8], y[4:8])}


def vec(F) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in F.values()])


# ------------------------------------------------------------------------------------------------
# scenarios of the "core" group
# ------------------------------------------------------------------------------------------------
def deterministic(rank):
    out = {}
    for name in ("relu_mlp", "token_lm"):
        for fim_type in ("exact", "empirical"):
            for reduction in ("sum", "mean"):
                case, sh = shards(name)
                est = fimfast.DiagFisher(case.model, fim_type, reduction=reduction,
                                         likelihood=case.likelihood)
                for b in sh[rank]:
                    est.step(b)
                key = f"{name}/{fim_type}/{reduction}"
                F = est.result()
                out[key] = {"reduced": vec(F), "again": vec(est.result()),
                            "local": vec(est.result(local=True)), "count": F.meta["count"]}
    return out


def read_then_step(rank):
    """Reading is non-destructive: step on after a read, read again."""
    case, sh = shards("relu_mlp")
    est = fimfast.DiagFisher(case.model, "exact")
    est.step(sh[rank][0])
    first = vec(est.result())
    for b in sh[rank][1:]:
        est.step(b)
    return {"first": first, "final": vec(est.result()), "final_again": vec(est.result())}


def functional(rank):
    case, sh = shards("relu_mlp")
    fimfast.zero_diag_fim(case.model)
    for b in sh[rank]:
        fimfast.diag_fim_step(case.model, b, "exact", reduction="mean")
    a = fimfast.get_diag_fim(case.model, "exact")
    b = fimfast.get_diag_fim(case.model, "exact")
    loc = fimfast.get_diag_fim(case.model, "exact", local=True)
    return {"reduced": torch.cat([v.reshape(-1) for v in a.values()]),
            "again": torch.cat([v.reshape(-1) for v in b.values()]),
            "local": torch.cat([v.reshape(-1) for v in loc.values()])}


def ema(rank):
    out = {}
    for reduction in ("sum", "mean"):
        case, sh = equal_shards()
        x, y = sh[rank]
        est = fimfast.DiagFisher(case.model, "exact", reduction=reduction, ema=0.7)
        est.step((x[:2], y[:2]))
        est.step((x[2:], y[2:]))
        out[reduction] = vec(est.result())
    return out


def ema_unequal_steps(rank):
    case, sh = equal_shards()
    est = fimfast.DiagFisher(case.model, "exact", ema=0.5)
    for _ in range(rank + 1):
        est.step(sh[rank])
    try:
        est.result()
    except ValueError as exc:
        return str(exc)
    return "no error"


def random_in_law(rank):
    out = {}
    for fim_type in RANDOM_TYPES:
        case, sh = shards("relu_mlp")
        draws = []
        for d in range(DRAWS):
            est = fimfast.DiagFisher(case.model, fim_type, seed=d)
            for b in sh[rank]:
                est.step(b)
            draws.append(vec(est.result()))
        out[fim_type] = torch.stack(draws)
    return out


def rank_streams(rank):
    """Both ranks on the same data with the same seed: independent probes unless "none"."""
    case, sh = equal_shards()
    out = {}
    for mode in ("auto", "none"):
        est = fimfast.DiagFisher(case.model, "hutchinson", seed=123, distributed=mode)
        est.step(sh[0])
        out[mode] = vec(est.result(local=True))
    return out


CORE = {
    "deterministic": deterministic,
    "read_then_step": read_then_step,
    "functional": functional,
    "ema": ema,
    "ema_unequal_steps": ema_unequal_steps,
    "random_in_law": random_in_law,
    "rank_streams": rank_streams,
}


# ------------------------------------------------------------------------------------------------
# scenarios of the "wrappers" group
# ------------------------------------------------------------------------------------------------
def ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    case, sh = equal_shards()
    model = DDP(case.model)
    calls = [0]

    def count_allreduce(state, bucket):
        calls[0] += 1
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / dist.get_world_size())

    model.register_comm_hook(None, count_allreduce)
    out = {}
    for fim_type in ("exact", "hutchinson"):
        est = fimfast.DiagFisher(model, fim_type, seed=0)
        for _ in range(3):
            est.step(sh[rank])
        out[f"{fim_type}_names"] = list(est.result())
        out[f"{fim_type}_reduced"] = vec(est.result())
    out["allreduce_after_fisher_steps"] = calls[0]
    out["grads_after_fisher_steps"] = [p.grad is None for p in model.parameters()]
    est = fimfast.DiagFisher(model, "exact")
    est.train_step(sh[rank])
    out["allreduce_after_train_step"] = calls[0]
    out["train_grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    out["train_fisher"] = vec(est.result())
    model.zero_grad(set_to_none=True)
    x, y = sh[rank]
    torch.nn.functional.cross_entropy(model(x), y).backward()  # ordinary DDP training still works
    out["allreduce_after_training_backward"] = calls[0]
    return out


def fsdp2(rank):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        return f"skip: torch.distributed.fsdp.fully_shard cannot be imported ({exc})"
    case, sh = shards("relu_mlp")
    try:
        model = fully_shard(case.model)
    except Exception as exc:
        return f"skip: fully_shard fails on CPU/gloo here ({type(exc).__name__}: {exc})"
    out = {"param_types": sorted({type(p).__name__ for p in model.parameters()})}
    # FSDP2's forward all-gathers: the ranks step in lockstep, so rank 1 splits its 3 samples
    x, y = sh[1][0]
    batches = sh[0] if rank == 0 else [(x[:2], y[:2]), (x[2:], y[2:])]
    for fim_type in ("exact", "hutchinson"):
        est = fimfast.DiagFisher(model, fim_type, seed=0)
        for b in batches:
            est.step(b)
        out[fim_type] = vec(est.result())
    # nested units: resharded after their forward (the default) is refused, kept unsharded works
    for reshard in (True, False):
        case, _ = shards("relu_mlp")
        for sub in (case.model[0], case.model[2]):
            fully_shard(sub, reshard_after_forward=reshard)
        model = fully_shard(case.model)
        est = fimfast.DiagFisher(model, "exact")
        try:
            for b in batches:
                est.step(b)
            out[f"nested_reshard_{reshard}"] = vec(est.result())
        except ValueError as exc:
            out[f"nested_reshard_{reshard}"] = str(exc)
    return out


def fsdp1(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    case, _ = shards("relu_mlp")
    try:
        model = FSDP(case.model, device_id=torch.device("cpu"), use_orig_params=True)
    except Exception as exc:
        return f"skip: FSDP1 fails on CPU/gloo here ({type(exc).__name__}: {exc})"
    try:
        fimfast.DiagFisher(model, "hutchinson")
    except ValueError as exc:
        return str(exc)
    return "no error"


WRAPPERS = {"ddp": ddp, "fsdp2": fsdp2, "fsdp1": fsdp1}


# ------------------------------------------------------------------------------------------------
# structured representations (tests/test_structured_state.py)
# ------------------------------------------------------------------------------------------------
def structured_shards():
    """``(float64 encoder model, {rank: [batches]})``: rank 0 gets 3 + 2 samples, rank 1 3."""
    case = make_case("encoder", N=8, seed=2).to(torch.float64)
    ids, y = case.batch
    return case.model.eval(), {0: [(ids[0:3], y[0:3]), (ids[3:5], y[3:5])],
                               1: [(ids[5:8], y[5:8])]}


def structured(rank):
    model, sh = structured_shards()
    out = {}
    for rep in ("kfac", "ekfac", "quasi_diag", "dense", "block_diag", "low_rank"):
        for reduction in ("sum", "mean"):
            F = fimfast.fisher(model, sh[rank], "exact", rep, reduction)
            local = fimfast.fisher(model, sh[rank], "exact", rep, reduction, distributed="none")
            out[f"{rep}/{reduction}"] = {"dense": F.to_dense(), "count": F.meta["count"],
                                         "local": local.to_dense()}
            if rep == "low_rank":
                out[f"{rep}/{reduction}"]["factor"] = F.factor
                T = fimfast.fisher(model, sh[rank], "exact", rep, reduction, rank=3)
                out[f"{rep}/{reduction}"]["rank3"] = T.to_dense()
    for reduction in ("sum", "mean"):
        F = fimfast.fisher(model, sh[rank], "exact", "kfac", reduction, kfac_approx="reduce")
        out[f"kfac_reduce/{reduction}"] = {"dense": F.to_dense(), "rows": F.A[0].shape[0]}
    # resumed on each rank from a state saved mid-way, then reduced
    acc = FisherAccumulator(model, "exact", "low_rank", "sum", seed=0)
    acc.update(sh[rank][0])
    state = acc.state_dict()
    acc = FisherAccumulator(model, "exact", "low_rank", "sum", seed=0)
    acc.load_state_dict(state)
    acc.add(sh[rank][1:])
    out["low_rank/resumed"] = acc.result().factor
    # the rows of all ranks exceed max_rows while each rank's own rows fit: refused on every rank
    per_sample = fimfast.fisher(model, sh[1], "exact", "low_rank", distributed="none").rank // 3
    try:
        fimfast.fisher(model, sh[rank], "exact", "low_rank", max_rows=5 * per_sample)
        out["low_rank/max_rows"] = "no error"
    except ValueError as exc:
        out["low_rank/max_rows"] = str(exc)
    return out


STRUCTURED = {"structured": structured}


def main() -> None:
    group, outdir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    results = {}
    for name, fn in {"core": CORE, "wrappers": WRAPPERS, "structured": STRUCTURED}[group].items():
        try:
            results[name] = fn(rank)
        except Exception:
            results[name] = "error: " + traceback.format_exc()
        dist.barrier()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    # free every model and estimator that holds the group (DDP modules sit in reference cycles),
    # then destroy it together: a gloo group destroyed while still referenced, or by a rank that
    # leaves early, can abort the process at exit
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
