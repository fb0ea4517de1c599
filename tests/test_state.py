"""The accumulated state: the first commit adopts fresh batch estimates, every later one adds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimfast import DiagFisher
from fimfast.state import State


def _state(ema=None, reduction="sum") -> State:
    params = [torch.zeros(3, 2), torch.zeros(4, dtype=torch.float64)]
    return State(["w", "b"], params, reduction, ema)


def _fresh() -> list[torch.Tensor]:
    return [torch.rand(3, 2), torch.rand(4, dtype=torch.float64)]


def test_first_owned_commit_adopts_then_later_commits_add():
    st = _state()
    first, second = _fresh(), _fresh()
    expect = [a + b for a, b in zip(first, second)]
    st.commit(first, 5, owned=True)
    assert all(v is f for v, f in zip(st.values, first))
    st.commit(second, 7, owned=True)  # never adopted again: added into the values
    assert all(v is f for v, f in zip(st.values, first))
    assert all(torch.equal(v, e) for v, e in zip(st.values, expect))
    assert (st.count, st.steps) == (12, 2)


def _view_of_larger() -> list[torch.Tensor]:
    return [torch.rand(10)[:6].view(3, 2), torch.rand(4, dtype=torch.float64)]


def _same_storage() -> list[torch.Tensor]:
    t = torch.rand(8, dtype=torch.float64)
    return [torch.rand(3, 2), t[:4]]


@pytest.mark.parametrize(
    "make,bad",
    [
        (lambda: [torch.rand(3, 2, dtype=torch.float64), torch.rand(4, dtype=torch.float64)], 0),
        (lambda: [torch.rand(2, 3).t(), torch.rand(4, dtype=torch.float64)], 0),
        (_view_of_larger, 0),
        (_same_storage, 1),
        (lambda: [torch.rand(3, 2, requires_grad=True), torch.rand(4, dtype=torch.float64)], 0),
    ],
    ids=["dtype", "strided", "view", "shared_storage", "requires_grad"],
)
def test_tensors_that_cannot_be_values_are_added(make, bad):
    st = _state()
    new = make()
    with torch.no_grad():
        st.commit(new, 1, owned=True)
    for i, (v, n) in enumerate(zip(st.values, new)):
        # the entry that cannot be a value is added to zeros (cast if need be), the other adopted
        assert (v is n) == (i != bad)
        torch.testing.assert_close(v, n.detach().to(v.dtype).reshape(v.shape))


def test_not_owned_or_not_zero_or_ema_is_never_adopted():
    st = _state()
    new = _fresh()
    st.commit(new, 1)  # not owned: the caller may still use them
    assert not any(v is n for v, n in zip(st.values, new))
    loaded = _state()
    loaded.load_state_dict(st.state_dict())
    again = _fresh()
    loaded.commit(again, 1, owned=True)  # loaded values are not the zeros
    assert not any(v is n for v, n in zip(loaded.values, again))
    torch.testing.assert_close(loaded.values[0], new[0] + again[0])
    ema = _state(ema=0.9)
    est = _fresh()
    ema.commit([e.clone() for e in est], 1, owned=True)
    torch.testing.assert_close(ema.values[0], 0.1 * est[0])


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "hutchinson"])
def test_result_never_aliases_the_adopted_state(fim_type):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    est = DiagFisher(m, fim_type, seed=3)
    est.step(batch)
    one = {n: t.clone() for n, t in est.result().items()}
    est.result()["0.weight"].add_(1e6)  # a caller modifying its result in place
    for n, t in est.result().items():
        assert torch.equal(t, one[n])
    if fim_type == "exact":  # deterministic: a second step on the same batch doubles the sum
        est.step(batch)
        for n, t in est.result().items():
            torch.testing.assert_close(t, 2 * one[n], rtol=1e-12, atol=0)


def test_first_commit_adopts_dense_entries_beside_a_sparse_one():
    """A table estimate kept as rows (sparse) does not stop the dense entries from being adopted;
    it is added at its rows into zeros."""
    st = _state()
    rows = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), torch.tensor([1.0, 2.0, 4.0]), (4,),
                                   dtype=torch.float64)
    dense = torch.rand(3, 2)
    st.commit([dense, rows], 2, owned=True)
    assert st.values[0] is dense
    assert st.values[1].layout == torch.strided
    assert st.values[1].tolist() == [0.0, 3.0, 0.0, 4.0]


@pytest.mark.parametrize("case", ["dense", "low precision", "unset", "sparse"])
def test_squares_fold_in_one_call_as_the_general_loop(monkeypatch, case):
    from fimfast import state as statelib
    from fimfast.step import Squares

    def fold(general: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        st = _state()
        st.commit(_fresh(), 4, owned=True)  # not zero any more: the next commit folds
        g = [torch.full((3, 2), 0.5), torch.arange(4, dtype=torch.float64)]
        if case == "low precision":
            g[0] = g[0].bfloat16()
        elif case == "unset":
            g[1] = None
        elif case == "sparse":
            g[1] = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([2.0, 3.0]), (4,),
                                           dtype=torch.float64)
        if general:
            monkeypatch.setattr(statelib, "_dense_in", lambda *a: False)
        fast = statelib._dense_in(g, st.dtypes)
        assert fast is (not general and case == "dense")
        before = [v.clone() for v in st.values]
        st.commit(Squares(g, [False, False], st.dtypes, 2.0), 4)
        monkeypatch.undo()
        want = [b + 2.0 * (x.to_dense().to(b.dtype) ** 2 if x is not None else 0)
                for b, x in zip(before, g)]
        assert all(torch.equal(v, w) for v, w in zip(st.values, want))
        return st.values

    assert all(torch.equal(a, b) for a, b in zip(fold(False), fold(True)))
