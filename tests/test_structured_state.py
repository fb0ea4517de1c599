"""Structured Fishers accumulated batch by batch: saved mid-way and resumed (bit for bit), and
summed over the ranks of a gloo process group (equal to one process on the union of the shards).
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import make_case

import fimfast
from fimfast.structured import FisherAccumulator

REPS = ["kfac", "ekfac", "quasi_diag", "dense", "block_diag", "low_rank"]


def _data():
    case = make_case("encoder", N=9, seed=1)
    ids, y = case.batch
    return case.model.eval(), [(ids[i:i + 3], y[i:i + 3]) for i in range(0, 9, 3)]


def _tensors(F):
    return {k: v for k, v in F._tensors().items()}


def _run(model, data, rep, stop=None, path=None, **kw):
    """Accumulate over ``data`` (twice for EKFAC); with ``stop=(phase, k)`` save after ``k``
    batches of that phase, rebuild everything from the file and go on."""
    def new(m):
        return FisherAccumulator(m, "monte_carlo", rep, num_probes=2, seed=5, **kw)

    acc = new(model)
    phases = ["factors", "refit"] if rep == "ekfac" else ["factors"]
    for ph in phases:
        if ph == "refit":
            acc.start_refit()
        for k, b in enumerate(data):
            if stop == (ph, k):
                torch.save(acc.state_dict(), path)
                acc = new(copy.deepcopy(model))
                acc.load_state_dict(torch.load(path))  # weights_only: plain data
            acc.update(b)
    return acc.result()


@pytest.mark.parametrize("rep", REPS)
def test_resume_is_bit_identical(rep, tmp_path):
    model, data = _data()
    full = _run(model, data, rep)
    stops = [("factors", 1), ("factors", 2)] + ([("refit", 0), ("refit", 2)] if rep == "ekfac"
                                                 else [])
    for stop in stops:
        F = _run(model, data, rep, stop, tmp_path / "state.pt")
        a, b = _tensors(full), _tensors(F)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rep, stop, k)
        assert F.meta["count"] == full.meta["count"] == 9


def test_resume_embedding_reduce_is_bit_identical(tmp_path):
    """The embedding's reduce rows (a sparse factor) are saved and resumed too."""
    model, data = _data()
    full = _run(model, data, "kfac", kfac_approx="reduce")
    assert full.A[0].is_sparse and full.A[0].shape[0] == 9
    for stop in [("factors", 1), ("factors", 2)]:
        F = _run(model, data, "kfac", stop, tmp_path / "state.pt", kfac_approx="reduce")
        a, b = _tensors(full), _tensors(F)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stop, k)


def test_fisher_equals_the_accumulator():
    model, data = _data()
    F = fimfast.fisher(model, data, "monte_carlo", "ekfac", num_probes=2, seed=5)
    G = _run(model, data, "ekfac")
    for k, v in _tensors(F).items():
        assert torch.equal(v, _tensors(G)[k])


def test_state_mismatch_and_phase_errors(tmp_path):
    model, data = _data()
    acc = FisherAccumulator(model, "exact", "kfac")
    acc.update(data[0])
    sd = acc.state_dict()
    with pytest.raises(ValueError, match="another representation"):
        FisherAccumulator(model, "exact", "quasi_diag").load_state_dict(sd)
    with pytest.raises(ValueError, match="another fim_type"):
        FisherAccumulator(model, "empirical", "kfac").load_state_dict(sd)
    with pytest.raises(ValueError, match="another options"):
        FisherAccumulator(model, "exact", "kfac", num_probes=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="dict from FisherAccumulator.state_dict"):
        acc.load_state_dict({"A": 1})
    with pytest.raises(ValueError, match="start_refit is for representation='ekfac'"):
        acc.start_refit()
    e = FisherAccumulator(model, "exact", "ekfac")
    e.update(data[0])
    with pytest.raises(ValueError, match="call start_refit"):
        e.result()
    with pytest.raises(ValueError, match="no batch was added"):
        FisherAccumulator(model, "exact", "kfac").result()
    with pytest.raises(ValueError, match="distributed must be"):
        FisherAccumulator(model, "exact", "kfac", distributed="yes")
    with pytest.raises(ValueError, match="representation must be one of"):
        FisherAccumulator(model, "exact", "diag")


# -- torch.distributed ------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from test_distributed import launch

    return launch("structured", tmp_path_factory.mktemp("structured"))


@pytest.mark.distributed
@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag", "dense", "block_diag",
                                 "low_rank"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_ranks_equal_one_process_on_the_union(ranks, rep, reduction):
    from dist_worker import structured_shards

    model, sh = structured_shards()
    union = sh[0] + sh[1]
    ref = fimfast.fisher(model, union, "exact", rep, reduction, distributed="none")
    key = f"{rep}/{reduction}"
    for r, res in enumerate(ranks):
        got = res["structured"]
        assert not isinstance(got, str), got
        assert got[key]["count"] == ref.meta["count"] == 8
        D, want = got[key]["dense"], ref.to_dense()
        err = float((D - want).abs().max() / want.abs().max())
        assert err < 1e-12, (r, rep, reduction, err)
        local = got[key]["local"]  # the rank's own shard, read with distributed="none"
        own = fimfast.fisher(model, sh[r], "exact", rep, reduction, distributed="none")
        torch.testing.assert_close(local, own.to_dense(), rtol=1e-12, atol=1e-14)
        if rep == "kfac":  # with an embedding under reduce: its rows stacked in rank order
            red = fimfast.fisher(model, union, "exact", rep, reduction, kfac_approx="reduce",
                                 distributed="none").to_dense()
            got_red = got[f"kfac_reduce/{reduction}"]
            assert got_red["rows"] == 8
            err = float((got_red["dense"] - red).abs().max() / red.abs().max())
            assert err < 1e-12, (r, reduction, err)
        if rep == "low_rank":  # the union's rows in rank order, and its top eigenpairs
            torch.testing.assert_close(got[key]["factor"], ref.factor, rtol=1e-12, atol=1e-14)
            top = fimfast.fisher(model, union, "exact", rep, reduction, rank=3,
                                 distributed="none").to_dense()
            err = float((got[key]["rank3"] - top).abs().max() / top.abs().max())
            assert err < 1e-12, (r, reduction, err)


@pytest.mark.distributed
def test_low_rank_resumed_and_max_rows_over_ranks(ranks):
    from dist_worker import structured_shards

    model, sh = structured_shards()
    ref = fimfast.fisher(model, sh[0] + sh[1], "exact", "low_rank", "sum", distributed="none")
    C = ref.rank // 8
    for res in ranks:
        torch.testing.assert_close(res["structured"]["low_rank/resumed"], ref.factor,
                                   rtol=1e-12, atol=1e-14)
        msg = res["structured"]["low_rank/max_rows"]
        assert f"{8 * C} rows (per rank: [{5 * C}, {3 * C}])" in msg, msg
        assert f"max_rows={5 * C}" in msg, msg


class _Raise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward of this batch failed")


class _Faulty(torch.nn.Module):
    """Linear-tanh-Linear whose forward writes into its first weight in place (``write``: the
    value is unchanged, its version is not) or whose backward raises (``backward``)."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.a, self.b = torch.nn.Linear(width, 4), torch.nn.Linear(4, 3)
        self.fault = None

    def forward(self, x):
        if self.fault == "write":
            with torch.no_grad():
                self.a.weight.mul_(1.0)
        h = torch.tanh(self.a(x))
        return self.b(_Raise.apply(h) if self.fault == "backward" else h)


def _state(acc):
    sd = acc.state_dict()
    return sd["stream"], [{k: v for k, v in s.items()} for s in sd.get("sums", [])], \
        sd.get("sum")


def _same(x, y):
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return x == y


@pytest.mark.parametrize("rep", ["kfac", "ekfac", "quasi_diag", "dense"])
@pytest.mark.parametrize("fault", ["write", "backward"])
def test_failed_batch_leaves_the_state(rep, fault):
    """A batch that fails (a refused in-place write into a parameter, or an error in the
    model's backward) raises and leaves the sums and the random stream as they were, on the
    first batch of a phase (empty sums) and on a later one; going on gives, bit for bit, the
    Fisher of the good batches."""
    torch.manual_seed(0)
    model = _Faulty().double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    phases = ["factors", "refit"] if rep == "ekfac" else ["factors"]

    def run(at=None):
        acc = FisherAccumulator(model, "monte_carlo", rep, "sum", num_probes=2, seed=3)
        for ph in phases:
            if ph == "refit":
                acc.start_refit()
            for k, b in enumerate(data):
                if (ph, k) == at:
                    before = _state(acc)
                    model.fault = fault
                    err = fimfast.UnsupportedModelError if fault == "write" else RuntimeError
                    with pytest.raises(err):
                        acc.update(b)
                    model.fault = None
                    assert _same(_state(acc), before), (ph, k)
                acc.update(b)
        return _tensors(acc.result())

    want = run()
    for at in [(ph, k) for ph in phases for k in range(2)]:
        got = run(at)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (at, k)


class _RaiseSecond(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _RaiseSecond.calls += 1
        if _RaiseSecond.calls == 2:
            raise RuntimeError("second backward of this batch failed")
        return g


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
def test_failed_later_chunk_of_a_first_batch_empties_the_sums(rep):
    """Two chunks of cotangents (``pair_chunk=1``, two draws): the first is added, the second's
    backward fails; the sums, empty before the batch, are empty again (an input factor of 201
    columns, kept in upper block rows, included)."""
    torch.manual_seed(0)
    model = _Faulty(200).double()
    x, y = torch.randn(6, 200, dtype=torch.float64), torch.randint(0, 3, (6,))
    acc = FisherAccumulator(model, "monte_carlo", rep, "sum", num_probes=2, seed=3,
                            pair_chunk=1)
    model.forward = lambda x: model.b(_RaiseSecond.apply(torch.tanh(model.a(x))))
    _RaiseSecond.calls = 0
    with pytest.raises(RuntimeError, match="second backward"):
        acc.update((x, y))
    del model.forward
    assert _RaiseSecond.calls == 2
    assert all(s.empty and not s.unset for s in acc.sums) and acc.stream.count == 0
    got = _tensors(acc.update((x, y)) or acc.result())
    ref = FisherAccumulator(model, "monte_carlo", rep, "sum", num_probes=2, seed=3,
                            pair_chunk=1)
    want = _tensors(ref.update((x, y)) or ref.result())
    assert all(torch.equal(want[k], got[k]) for k in want)
