"""Row-sparse table gradients in HUTCHINSON steps (fimfast/sparse_tables.py): the same estimate as
the dense backward, the modules left as they were, training steps untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fimfast
from fimfast import sparse_tables

V, D, C = 1500, 6, 5


class _Bag(nn.Module):
    def __init__(self, mode="mean", tied=False, padding_idx=None, sparse=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode, padding_idx=padding_idx, sparse=sparse)
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(2 * D, D if tied else C)
        self.tied = tied

    def forward(self, batch):
        ids, offsets, tok = batch
        h = torch.cat([self.bag(ids, offsets), self.emb(tok).mean(1)], -1)
        h = torch.tanh(self.fc(h))
        if getattr(self, "poison", False):
            h = h * float("nan")
        if self.tied:  # the token table is also the output layer: a dense gradient beside
            return F.linear(h, self.emb.weight[:C])
        return h


def _batch(seed=0, N=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (N,), generator=g)
    ids = torch.randint(0, 40, (int(lengths.sum()),), generator=g)  # repeated rows
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    tok = torch.randint(0, V, (N, 3), generator=g)
    return {"inputs": (ids, offsets, tok), "labels": torch.randint(0, C, (N,), generator=g)}


def _run(model, fim_type, batches, dense=False, **kw):
    opts = kw.pop("opts", {})
    est = fimfast.DiagFisher(model, fim_type, seed=5, forward_fn=_fwd, **opts, **kw)
    if dense:
        est._sparse_tables = lambda params: []
    for b in batches:
        est.step(b)
    return dict(est.result())


def _fwd(model, batch):
    return model(batch["inputs"])


@pytest.mark.parametrize(
    "fim_type,opts",
    [("hutchinson", {}), ("hutchinson", {"num_probes": 3}), ("hutchinson_sqrt", {}),
     ("hutchinson_dg", {})],
)
@pytest.mark.parametrize("reduction,ema", [("sum", None), ("mean", None), ("mean", 0.8)])
@pytest.mark.parametrize("variant", ["mean", "sum_padding", "tied"])
def test_sparse_table_gradients_give_the_dense_estimate(fim_type, opts, reduction, ema, variant):
    torch.manual_seed(0)
    kw = {"mean": {}, "sum_padding": {"mode": "sum", "padding_idx": 3}, "tied": {"tied": True}}
    model = _Bag(**kw[variant]).double()
    batches = [_batch(s) for s in range(3)]
    assert len(sparse_tables.candidates(model, list(model.parameters()))) == 2
    got = _run(model, fim_type, batches, reduction=reduction, ema=ema, opts=opts)
    want = _run(model, fim_type, batches, dense=True, reduction=reduction, ema=ema, opts=opts)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-18)
    assert torch.count_nonzero(got["bag.weight"]) > 0
    # rows no batch looked up stay exactly zero (the tied table is dense through the head)
    untouched = torch.ones(V, dtype=torch.bool)
    for b in batches:
        untouched[b["inputs"][0]] = False
    assert torch.count_nonzero(got["bag.weight"][untouched]) == 0
    assert not model.bag.sparse and not model.emb.sparse  # put back


def test_sparse_backward_is_taken_and_modules_are_put_back_after_a_failing_step():
    model = _Bag().double()
    est = fimfast.DiagFisher(model, "hutchinson", seed=0, forward_fn=_fwd)
    seen = []
    model.emb.register_forward_hook(lambda m, a, o: seen.append(m.sparse))
    est.step(_batch())
    assert seen == [True]
    before = dict(est.result())

    model.poison = True
    with pytest.raises(ValueError, match="non-finite"):
        est.step(_batch(1))
    assert not model.emb.sparse and not model.bag.sparse
    after = dict(est.result())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_train_step_keeps_dense_gradients():
    model = _Bag().double()
    est = fimfast.DiagFisher(model, "hutchinson", seed=0, forward_fn=_fwd)
    est.train_step(_batch())
    assert model.bag.weight.grad.layout == torch.strided
    assert model.emb.weight.grad.layout == torch.strided


def test_user_sparse_tables_and_max_bags():
    """A table the user made sparse is left sparse; a ``mode='max'`` bag and a small table keep
    the dense backward; all three give the dense estimate."""
    model = _Bag(mode="max").double()
    model.emb.sparse = True
    small = nn.Embedding(sparse_tables.MIN_ROWS - 1, 2)
    assert sparse_tables.candidates(model, list(model.parameters())) == []
    assert sparse_tables.candidates(small, list(small.parameters())) == []
    wrapped = nn.Sequential(torch.compile(nn.Embedding(2 * sparse_tables.MIN_ROWS, 2)))
    assert sparse_tables.candidates(wrapped, list(wrapped.parameters())) == []
    batches = [_batch(s) for s in range(2)]
    got = _run(model, "hutchinson", batches)
    assert model.emb.sparse
    model.emb.sparse = False
    want = _run(model, "hutchinson", batches, dense=True)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-18)


def test_row_squares_sums_repeated_rows_before_squaring():
    i = torch.tensor([[2, 0, 2]])
    v = torch.tensor([[1.0, 1.0], [3.0, -1.0], [2.0, 2.0]])
    rows, sq = sparse_tables.row_squares(torch.sparse_coo_tensor(i, v, (4, 2)), torch.float64)
    assert rows.tolist() == [0, 2]
    assert sq.dtype == torch.float64
    assert sq.tolist() == [[9.0, 1.0], [9.0, 9.0]]
