"""torch.distributed (gloo, 2 CPU processes): a ``DistributedDataParallel`` model, shards of
unequal sizes, ``sum`` and ``mean``: every representation read on a rank equals one process on
the union of the shards with the unwrapped model (tests/dist_worker_above.py)."""

from __future__ import annotations

import pytest
import torch
from dist_launch import two_ranks
from dist_worker_above import REPS, model_and_shards

import fimfast

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_above")
    out = two_ranks("dist_worker_above.py", [str(tmp)], tmp)
    for o in out:
        assert not isinstance(o, str), o
    return out


@pytest.mark.parametrize("rep", ("diag",) + REPS)
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ddp_uneven_shards_equal_one_process_on_the_union(ranks, rep, fim_type, reduction):
    model, sh = model_and_shards()
    union = sh[0] + sh[1]
    if rep == "diag":
        F = fimfast.diag_fisher(model, union, fim_type, reduction=reduction)
        names, want = list(F), F.to_vector()
    else:
        F = fimfast.fisher(model, union, fim_type, rep, reduction)
        names, want = list(F.names), F.to_dense()
    assert want.abs().max() > 1e-3
    for r, res in enumerate(ranks):
        got_names, got, count = res[f"{rep}/{fim_type}/{reduction}"]
        assert count == 8, (r, count)
        assert [n.removeprefix("module.") for n in got_names] == names
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13), (r, (got - want).abs().max())


@pytest.mark.parametrize("rep", ["diag", "kfac"])
def test_distributed_none_reads_the_rank_shard_only(ranks, rep):
    """``fimfast.fisher(..., "diag", distributed="none")`` dropped the argument: the diagonal
    was summed over the ranks all the same."""
    model, sh = model_and_shards()
    for r, res in enumerate(ranks):
        F = fimfast.fisher(model, sh[r], "exact", rep, "sum")
        want = F.to_vector() if rep == "diag" else F.to_dense()
        assert torch.allclose(res[f"local/{rep}"], want, rtol=1e-10, atol=1e-13), r
