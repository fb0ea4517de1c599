"""A table's squares kept as the rows a step touched (fimfast/state.py ``Sums.add_rows``) and added
at those rows by ``State.commit``: the same estimate as a dense pass, against the float64 oracle
on a table large enough for the rows to stay sparse, and unit checks of the slot's bookkeeping."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle
from test_layers import _rel
from test_layers_conv_bag import Bag, _kw_case
from tolerances import DET_REL_F64
from torch import nn

from fimfast import DiagFisher
from fimfast.persample import engine
from fimfast.state import State, Sums


def _sums(V: int = 40, d: int = 3) -> Sums:
    return Sums([(V, d), (5,)], [torch.float64, torch.float64], [torch.device("cpu")] * 2)


def _rows(n: int, V: int = 40, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rid = torch.randint(0, V, (n,), generator=g)
    return rid, torch.rand(n, d, generator=g, dtype=torch.float64)


def _dense(V: int, d: int, *parts) -> torch.Tensor:
    out = torch.zeros(V, d, dtype=torch.float64)
    for rid, vals in parts:
        out.index_add_(0, rid, vals)
    return out


def test_few_rows_stay_sparse_and_repeated_rows_add():
    s = _sums()
    a, b = _rows(4, seed=0), _rows(5, seed=1)
    a = (torch.cat([a[0], a[0][:1]]), torch.cat([a[1], a[1][:1]]))  # a repeated row
    s.add_rows(0, *a)
    s.add_rows(0, *b)
    out = s.tensors()
    assert out[0].layout == torch.sparse_coo and out[1].layout == torch.strided
    assert torch.equal(out[0].to_dense(), _dense(40, 3, a, b))
    assert torch.equal(out[1], torch.zeros(5, dtype=torch.float64))


def test_many_rows_turn_dense_once():
    """Past a quarter of the table the slot becomes dense, each row added once."""
    s = _sums()
    parts = [_rows(6, seed=k) for k in range(3)]  # 6 rows kept; 12 > 40 / 4: dense
    for p in parts:
        s.add_rows(0, *p)
    out = s.tensors()[0]
    assert out.layout == torch.strided
    assert torch.equal(out, _dense(40, 3, *parts))


def test_dense_updates_after_rows_keep_them():
    s = _sums()
    p = _rows(3)
    s.add_rows(0, *p)
    full = torch.rand(40, 3, dtype=torch.float64)
    s.add(0, full.clone())  # not adopted: the rows are in the slot too
    assert torch.allclose(s.tensors()[0], full + _dense(40, 3, p), rtol=0, atol=1e-15)
    s2 = _sums()
    s2.add_rows(0, *p)
    s2.get(0)[1:3] += 1.0  # a block update densifies first
    ref = _dense(40, 3, p)
    ref[1:3] += 1.0
    assert torch.equal(s2.tensors()[0], ref)


@pytest.mark.parametrize("ema,reduction", [(None, "sum"), (None, "mean"), (0.9, "sum"),
                                           (0.9, "mean")])
def test_commit_adds_sparse_rows(ema, reduction):
    params = [torch.zeros(40, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    st, ref = (State(["t", "b"], params, reduction, ema) for _ in range(2))
    for k in range(2):
        s = _sums()
        p = _rows(4, seed=k)
        s.add_rows(0, *p)
        b = torch.rand(5, dtype=torch.float64)
        s.add(1, b.clone())
        est = s.tensors()
        assert est[0].layout == torch.sparse_coo
        st.commit(est, 3, owned=True)
        ref.commit([_dense(40, 3, p), b], 3, owned=True)
    for a, r in zip(st.read(), ref.read()):
        assert a.layout == torch.strided and torch.allclose(a, r, rtol=1e-14, atol=0)


def _big_bag_case(mode: str):
    torch.manual_seed(0)
    V = 400
    ids = torch.randint(1, V, (4, 6), generator=torch.Generator().manual_seed(5))
    ids[1, :3] = ids[1, 3]  # repeated ids of one sample add before the square
    bag = nn.EmbeddingBag(V, 3, mode=mode, padding_idx=0)
    return _kw_case(f"bag_{mode}_big", Bag(bag), {"ids": ids}, 3, 4)


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_large_table_matches_oracle_with_sparse_rows(fim_type, mode, monkeypatch):
    case = _big_bag_case(mode)
    seen = []
    orig = engine.Engine.estimate

    def spy(self, step, cap):
        out = orig(self, step, cap)
        if isinstance(out, Sums):  # kept rows (and products) that the state folds
            seen.append([torch.sparse_coo if i in out.rows else torch.strided
                         for i in range(len(out.slots))])
        else:
            seen.append([t.layout for t in out])
        return out

    monkeypatch.setattr(engine.Engine, "estimate", spy)
    c64 = case.to(torch.float64)
    est = DiagFisher(c64.model, fim_type, seed=7, class_dim=-1)
    est.step(c64.batch)
    est.step(c64.batch)  # the second commit adds the rows into the first one's values
    got = {k: v / 2 for k, v in est.result().items()}
    assert _rel(got, oracle(case, fim_type)) <= DET_REL_F64
    assert all(torch.sparse_coo in s for s in seen)
    assert not est._persample.last_plan.generic
