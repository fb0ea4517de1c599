"""torch.distributed: 2 ranks (gloo, 127.0.0.1) against one process on the union of the shards.

Each group of scenarios runs once in two fresh processes (tests/dist_worker.py); the tests compare
what every rank saved with references computed here in one process. EXACT / EMPIRICAL must equal
the single-process estimate (float32 summation order aside); the random types must agree in law.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from dist_launch import two_ranks
from dist_worker import DRAWS, RANDOM_TYPES, equal_shards, shards, vec
from tolerances import DET_REL_F32, STAT_SIGMAS

import fimfast

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(os.path.abspath(__file__))


def launch(group: str, tmp_path) -> list[dict]:
    return two_ranks("dist_worker.py", [group, str(tmp_path)], tmp_path)


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return launch("core", tmp_path_factory.mktemp("core"))


@pytest.fixture(scope="module")
def wrappers(tmp_path_factory):
    return launch("wrappers", tmp_path_factory.mktemp("wrappers"))


def result(res: list[dict], scenario: str):
    out = [r[scenario] for r in res]
    for o in out:
        if isinstance(o, str) and o.startswith("error:"):
            pytest.fail(f"{scenario} failed on a rank:\n{o}")
        if isinstance(o, str) and o.startswith("skip:"):
            pytest.skip(o[len("skip: "):])
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def single_process(name, fim_type, reduction="sum", **kw):
    """One process over every rank's batches (the union of the shards)."""
    case, sh = shards(name)
    est = fimfast.DiagFisher(case.model, fim_type, reduction=reduction,
                             likelihood=case.likelihood, **kw)
    for r in (0, 1):
        for b in sh[r]:
            est.step(b)
    return est.result()


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("name", ["relu_mlp", "token_lm"])
def test_deterministic_types_equal_single_process_on_the_union(core, name, fim_type, reduction):
    ranks = result(core, "deterministic")
    ref = single_process(name, fim_type, reduction)
    key = f"{name}/{fim_type}/{reduction}"
    for r in ranks:
        got = r[key]
        assert got["count"] == ref.meta["count"]  # rows of both shards
        assert rel(got["reduced"], vec(ref)) <= DET_REL_F32
        assert torch.equal(got["again"], got["reduced"])  # a second read does not double-count
    if reduction == "sum":  # the local shards add up to the union
        assert rel(ranks[0][key]["local"] + ranks[1][key]["local"], vec(ref)) <= DET_REL_F32


def test_reading_is_collective_and_non_destructive(core):
    ranks = result(core, "read_then_step")
    ref = single_process("relu_mlp", "exact")
    case, sh = shards("relu_mlp")
    first = fimfast.DiagFisher(case.model, "exact")
    first.step(sh[0][0])
    first.step(sh[1][0])
    for r in ranks:
        assert rel(r["first"], vec(first.result())) <= DET_REL_F32
        assert rel(r["final"], vec(ref)) <= DET_REL_F32
        assert torch.equal(r["final_again"], r["final"])


def test_get_diag_fim_reduces_across_ranks(core):
    ranks = result(core, "functional")
    ref = single_process("relu_mlp", "exact", "mean")
    for r in ranks:
        assert rel(r["reduced"], vec(ref)) <= DET_REL_F32
        assert torch.equal(r["again"], r["reduced"])
    assert not torch.allclose(ranks[0]["local"], ranks[1]["local"])  # local=True: own shard


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ema_equals_single_process_ema_of_the_union(core, reduction):
    """Each step of the single process sees both ranks' batches of that step."""
    ranks = result(core, "ema")
    case, sh = equal_shards()
    (x0, y0), (x1, y1) = sh[0], sh[1]
    est = fimfast.DiagFisher(case.model, "exact", reduction=reduction, ema=0.7)
    est.step((torch.cat([x0[:2], x1[:2]]), torch.cat([y0[:2], y1[:2]])))
    est.step((torch.cat([x0[2:], x1[2:]]), torch.cat([y0[2:], y1[2:]])))
    for r in ranks:
        assert rel(r[reduction], vec(est.result())) <= DET_REL_F32


def test_ema_with_unequal_steps_is_refused_on_every_rank(core):
    for msg in result(core, "ema_unequal_steps"):
        assert "same number of steps on every rank" in msg and "[1, 2]" in msg


def test_each_rank_draws_its_own_probes(core):
    a, b = result(core, "rank_streams")  # same data, same seed on both ranks
    assert not torch.equal(a["auto"], b["auto"])
    assert torch.equal(a["none"], b["none"])  # distributed="none": nothing mixed in


@pytest.mark.parametrize("fim_type", RANDOM_TYPES)
def test_random_types_agree_in_law(core, fim_type):
    """2 ranks vs one process, paired draw by draw, then in law against the closed form.

    Paired: draw d of the 2 ranks (seed d) must equal, coordinate by coordinate to float32
    rounding, the sum of two single-process estimates on the shards with the ranks' own streams
    (fimfast.distributed.rank_seed). Each rank's estimate is unbiased for its shard whatever its
    stream, so any bias of the distributed estimate comes from the reduction (rows or ranks
    counted twice or left out, a wrong scale); the paired check sees any such bias above DET_REL_F32
    (1e-6 relative) in every draw, where 48 unpaired draws a side could miss a 19% bias.

    In law: the mean over the DRAWS draws of each tensor's sum is within STAT_SIGMAS standard
    errors of the float64 closed form on the union (tests/oracle.py): exact for the unbiased
    types, the DG and RANKK bounds for theirs. Alpha ~ 4 tensors x 6.3e-5 (normal) per type.
    """
    from oracle import oracle as closed_form

    from fimfast.distributed import rank_seed

    ranks = result(core, "random_in_law")
    dist_draws = ranks[0][fim_type].double()
    assert torch.equal(dist_draws, ranks[1][fim_type].double())  # every rank reads the same
    case, sh = shards("relu_mlp")
    for d in range(DRAWS):
        paired = 0
        for r in (0, 1):
            est = fimfast.DiagFisher(case.model, fim_type, seed=rank_seed(d, r),
                                     distributed="none")
            for b in sh[r]:
                est.step(b)
            paired = paired + vec(est.result()).double()
        assert rel(dist_draws[d], paired) <= DET_REL_F32, f"draw {d}"
    quantity, k = {"hutchinson_dg": ("dg", 2), "hutchinson_rankk": ("rankk", 2),
                   "hutchinson_rank1": ("rankk", 1)}.get(fim_type, ("exact", 2))
    target = torch.stack([v.sum() for v in closed_form(case, quantity, k=k).values()])
    sizes = [p.numel() for p in case.model.parameters()]
    sums = torch.stack([t.sum(1) for t in dist_draws.split(sizes, dim=1)], dim=1)  # (DRAWS, 4)
    z = (sums.mean(0) - target).abs() / (sums.std(0) / DRAWS**0.5)
    assert bool((z <= STAT_SIGMAS).all()), z


# ------------------------------------------------------------------------------------------------
def test_ddp_fisher_steps_launch_no_allreduce_and_train_step_syncs(wrappers):
    ranks = result(wrappers, "ddp")
    case, sh = equal_shards()
    single = fimfast.DiagFisher(case.model, "exact")
    single.step(sh[0])
    single.step(sh[1])
    for r in ranks:
        assert r["exact_names"] == ["module." + n for n, _ in case.model.named_parameters()]
        # 3 steps per rank: 3x the union
        assert rel(r["exact_reduced"], 3 * vec(single.result())) <= DET_REL_F32
        assert r["allreduce_after_fisher_steps"] == 0  # neither step nor the probe backward
        assert all(r["grads_after_fisher_steps"])  # .grad untouched (None)
        assert r["allreduce_after_train_step"] == 1  # the loss backward, one bucket
        assert r["allreduce_after_training_backward"] == 2
        assert rel(r["train_fisher"], vec(single.result())) <= DET_REL_F32
    # DDP averages the ranks' mean-loss gradients: with equal shards, the union's mean loss
    x = torch.cat([sh[0][0], sh[1][0]])
    y = torch.cat([sh[0][1], sh[1][1]])
    torch.nn.functional.cross_entropy(case.model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in case.model.parameters()])
    for r in ranks:
        assert rel(r["train_grads"], g) <= DET_REL_F32
    assert torch.equal(ranks[0]["hutchinson_reduced"], ranks[1]["hutchinson_reduced"])


def test_fsdp2_fully_shard(wrappers):
    ranks = result(wrappers, "fsdp2")
    ref = single_process("relu_mlp", "exact")
    for r in ranks:
        assert r["param_types"] == ["DTensor"]
        assert rel(r["exact"], vec(ref)) <= DET_REL_F32
    assert torch.equal(ranks[0]["hutchinson"], ranks[1]["hutchinson"])
    # HUTCHINSON paired with one process: each rank's own stream (rank_seed) on the batches it
    # stepped (rank 1 split its shard in two), summed
    from fimfast.distributed import rank_seed

    case, sh = shards("relu_mlp")
    x, y = sh[1][0]
    paired = 0
    for r, batches in ((0, sh[0]), (1, [(x[:2], y[:2]), (x[2:], y[2:])])):
        est = fimfast.DiagFisher(case.model, "hutchinson", seed=rank_seed(0, r),
                                 distributed="none")
        for b in batches:
            est.step(b)
        paired = paired + vec(est.result()).double()
    assert rel(ranks[0]["hutchinson"], paired) <= DET_REL_F32
    for r in ranks:  # nested units: reshard_after_forward=False works, the default is refused
        assert rel(r["nested_reshard_False"], vec(ref)) <= DET_REL_F32
        assert "reshard_after_forward=True" in r["nested_reshard_True"]


def test_fsdp1_is_refused_with_the_reason(wrappers):
    for msg in result(wrappers, "fsdp1"):
        assert "FullyShardedDataParallel (FSDP1) is not supported" in msg
        assert "every gradient comes back None" in msg


def test_ddp_example_runs_under_torchrun(tmp_path):
    """examples/ddp_fisher.py with torchrun, 2 CPU processes (gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(HERE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = tmp_path / "fim.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port),
         os.path.join(root, "examples", "ddp_fisher.py"), "--epochs", "1", "--samples", "128",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert "ranks: 2, rows: 128 (the union of the shards)" in proc.stdout
    F = fimfast.DiagFIM.load(str(out))
    assert list(F) == ["module.0.weight", "module.0.bias", "module.2.weight", "module.2.bias"]
