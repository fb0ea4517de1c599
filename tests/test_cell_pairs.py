"""The squares of a looped cell's weights by pairs of calls (fimfast/ops/pairs.py,
fimfast/persample/cell_lane.py): the op against a brute force and between its backends, bad
arguments named, and the cell loops on both squares paths (pairs forced on and off, columns in
one chunk or several, frozen weights) against the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
from cases import check_fast_twice, run_case
from oracle import oracle, rel_error
from test_cells import LOOPS, Loop, _case, _cell, _loop
from test_cells import C as CLASSES
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn

from fimfast import chunks, ops
from fimfast.ops import pairs
from fimfast.persample import cell_lane


def _brute(P, Q):
    return sum((P[m, n].T @ Q[n]) ** 2 for m in range(P.shape[0]) for n in range(P.shape[1]))


def _backends():
    return [b for b in ("torch", "cpp") if ops.backend_status(b, torch.device("cpu"))[0]]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_gram_products_equal_the_per_sample_squares(backend, dtype):
    if backend not in _backends():
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 5, 4, 6, generator=g, dtype=dtype)
    Q = torch.randn(5, 4, 7, generator=g, dtype=dtype)
    A = ops.pair_gram(P, backend=backend)
    assert A.shape == (5, 10, 6) and A.dtype == dtype
    got = pairs.pair_products(A, pairs.pair_inputs(Q))
    want = _brute(P, Q)
    tol = DET_REL_F64 if dtype == torch.float64 else DET_REL_F32
    assert (got - want).abs().max() <= tol * want.abs().max()
    # added into out: two chunks of columns give the whole
    A2 = ops.pair_gram(P[:1], backend=backend)
    assert ops.pair_gram(P[1:], out=A2, backend=backend) is A2
    torch.testing.assert_close(A2, A, rtol=tol, atol=tol * A.abs().max().item())
    # the positions as a list of strided views, read where they are
    Pl = [P.transpose(0, 1)[:, :, t].transpose(0, 1) for t in range(4)]
    assert Pl[0].stride() != Pl[0].contiguous().stride()
    torch.testing.assert_close(ops.pair_gram(Pl, backend=backend), A, rtol=tol,
                               atol=tol * A.abs().max().item())


def test_pair_gram_backends_agree_on_strided_and_half_inputs():
    if "cpp" not in _backends():
        pytest.skip("cpp unavailable")
    g = torch.Generator().manual_seed(1)
    P = torch.randn(2, 7, 3, 9, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(ops.pair_gram(P, backend="cpp"), ops.pair_gram(P, backend="torch"))
    Ph = P.to(torch.bfloat16)
    torch.testing.assert_close(ops.pair_gram(Ph, backend="cpp"),
                               ops.pair_gram(Ph, backend="torch"))
    assert ops.pair_gram(Ph).dtype == torch.float32
    empty = torch.zeros(0, 7, 3, 9)
    assert ops.pair_gram(empty, backend="cpp").abs().sum() == 0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_pair_gram_bad_arguments_are_named(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} unavailable")
    P = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="P must be a 4-D"):
        ops.pair_gram(P[0], backend=backend)
    with pytest.raises(ValueError, match="P must be a 4-D"):
        ops.pair_gram([P[:, :, 0], P[:1, :, 1]], backend=backend)
    with pytest.raises(ValueError, match="P must be a 4-D"):
        ops.pair_gram([], backend=backend)
    with pytest.raises(ValueError, match="out must be"):
        ops.pair_gram(P, out=torch.zeros(3, 9, 5), backend=backend)
    with pytest.raises(ValueError, match="out must be"):
        ops.pair_gram(P, out=torch.zeros(3, 10, 5, dtype=torch.float16), backend=backend)


@pytest.mark.parametrize("by_pairs", [True, False], ids=["pairs", "per_sample"])
@pytest.mark.parametrize("chunk", [None, 1], ids=["one_chunk", "column_chunks"])
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(LOOPS))
def test_cell_loop_squares_paths_match_the_oracle(name, quantity, chunk, by_pairs, monkeypatch):
    """Both squares paths of the cell's weights, the columns of EXACT in one backward or one at
    a time (the pairs' products then added up over the chunks): the oracle's Fisher."""
    seen = []

    def decide(M, N, T, O, I, device):
        seen.append(M)
        return by_pairs

    monkeypatch.setattr(cell_lane, "_by_pairs", decide)
    case = _loop(name, h0="input")
    est = check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64)
    assert seen, "the cell's weights did not take the cell lane"
    if chunk:
        got, est = run_case(case, quantity, class_chunk=chunk)
        assert rel_error(got, oracle(case, quantity)) <= DET_REL_F64
    for g in est._persample.last_plan.groups:
        assert g.state.cell is None  # finished


@pytest.mark.parametrize("frozen", [
    "c.weight_ih", "c.weight_hh", "c.bias_hh", "c.bias_ih", "c.bias_ih,c.bias_hh",
    "c.weight_ih,c.weight_hh", "c.weight_ih,c.bias_ih", "c.weight_hh,c.bias_hh",
    "c.weight_ih,c.weight_hh,c.bias_ih"])
@pytest.mark.parametrize("kind", ["gru", "lstm", "tanh"])
def test_cell_pairs_with_a_frozen_parameter(kind, frozen, monkeypatch):
    """Every subset of the sides of the pairs' products (the inputs, the ones of the biases,
    the states; the GRU's candidate rows of each side): the oracle's Fisher, nonzero."""
    monkeypatch.setattr(cell_lane, "_by_pairs", lambda *a: True)
    torch.manual_seed(1)
    case = _case(Loop(_cell(kind)), 6)
    names = frozen.split(",")
    for name in names:
        dict(case.model.named_parameters())[name].requires_grad_(False)
    ref = {k: v for k, v in oracle(case, "exact").items() if k not in names}
    assert all(v.abs().sum() > 0 for k, v in ref.items() if k.startswith("c."))
    check_fast_twice(case, "exact", ref, DET_REL_F64)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cell_pairs_without_biases(kind, monkeypatch):
    monkeypatch.setattr(cell_lane, "_by_pairs", lambda *a: True)
    case = _case(Loop(_cell(kind, bias=False)), 6)
    check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)


def test_cell_pairs_in_float32(monkeypatch):
    monkeypatch.setattr(cell_lane, "_by_pairs", lambda *a: True)
    case = _case(Loop(_cell("gru"), h0="input"), 6)
    want = oracle(case, "exact")
    got, est = run_case(case.to(torch.float32), "exact")
    assert not est._persample.last_plan.generic
    assert rel_error(got, want) <= DET_REL_F32


def test_cost_model_takes_pairs_for_many_columns_only():
    cpu = torch.device("cpu")
    assert cell_lane._by_pairs(9, 64, 16, 384, 160, cpu)
    assert not cell_lane._by_pairs(1, 64, 16, 384, 160, cpu)  # one column: per-sample products
    assert not cell_lane._by_pairs(9, 64, 16, 384, 2, cpu)  # few inputs
    assert not cell_lane._by_pairs(9, 64, 64, 384, 160, cpu)  # many calls


def test_pair_gram_kernel_opcheck_and_checks():
    """The compiled op: torch.library.opcheck (schema, fake, dispatch), its own argument checks
    naming the op and the argument."""
    if "cpp" not in _backends():
        pytest.skip("cpp unavailable")
    import fimfast.ops.cpp  # noqa: F401  (loads the extension and its fake implementations)

    g = torch.Generator().manual_seed(2)
    P, A = torch.randn(2, 3, 4, 5, generator=g), torch.randn(3, 10, 5, generator=g)
    Pl = list(P.unbind(2))
    torch.library.opcheck(torch.ops.fimfast.pair_gram_, (A, Pl, True))
    op = torch.ops.fimfast.pair_gram_
    with pytest.raises(RuntimeError, match="pair_gram_: A must be"):
        op(torch.zeros(3, 9, 5), Pl, False)
    with pytest.raises(RuntimeError, match=r"pair_gram_: P\[t\] must be 3-D"):
        op(A, [P], False)
    with pytest.raises(RuntimeError, match="pair_gram_: every P"):
        op(A, [Pl[0], Pl[1][:1]], False)
    with pytest.raises(RuntimeError, match="pair_gram_: P must hold"):
        op(A, [], False)
    with pytest.raises(RuntimeError, match="pair_gram_: A must be contiguous"):
        op(torch.zeros(3, 5, 10).transpose(1, 2), Pl, False)


def test_columns_grow_by_the_pairs_memory(monkeypatch):
    """A step whose cell takes the pairs may back-propagate as many more columns at once as the
    pairs' products take memory; none more without them, nor where a chunk holds them all."""
    case = _loop("gru_T4", h0="input")
    _, est = run_case(case, "exact")
    plan = est._persample.last_plan
    groups = [g for g in plan.groups if g.kind in (cell_lane.GroupKind.OUTER,
                                                    cell_lane.GroupKind.VEC)]
    taps = [t for c in plan.calls for t in c.taps]
    monkeypatch.setattr(cell_lane, "_by_pairs", lambda *a: False)
    assert cell_lane.columns(groups, taps, 1, 9) == 1
    monkeypatch.setattr(cell_lane, "_by_pairs", lambda *a: True)
    N, T, O = 5, 4, 15
    sizes = [math.prod(t.shape) for t in taps]
    more = 1 + 4 * N * (T * (T + 1) // 2) * O // (4 * (sum(sizes) + max(sizes)))
    assert more > 1
    assert cell_lane.columns(groups, taps, 1, 9) == chunks.balanced(9, more)
    assert cell_lane.columns(groups, taps, 9, 9) == 9


def test_pair_gram_with_an_extension_built_before_the_op(monkeypatch):
    """The cpp backend of an extension without ``pair_gram_`` (built before it) runs the torch
    reference: the same sums."""
    if "cpp" not in _backends():
        pytest.skip("cpp unavailable")
    from fimfast.ops import cpp

    class Stale:
        def __getattr__(self, name):
            if name == "pair_gram_":
                raise AttributeError(name)
            return getattr(torch.ops.fimfast, name)

    P = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    want = ops.pair_gram(P, backend="torch")
    monkeypatch.setattr(cpp.torch, "ops", type("Ops", (), {"fimfast": Stale()})())
    A = torch.empty_like(want)
    cpp.pair_gram_cpp_(A, list(P.unbind(2)), False)
    torch.testing.assert_close(A, want)


class _Wide(nn.Module):
    """A cell of any hidden size looped over the steps, a classifier on its last state."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.c, self.o = cell, nn.Linear(cell.hidden_size, CLASSES)

    def forward(self, x):
        h = None
        for xt in x.unbind(1):
            h = self.c(xt, h)
        return self.o(h[0] if isinstance(h, tuple) else h)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("kind,hidden", [("lstm", 32), ("gru", 128)])
def test_per_sample_squares_from_padded_rows(kind, hidden, quantity, monkeypatch):
    """Gates whose rows are a multiple of 1024 bytes (float64: 128 of an LSTM of 32, 384 of a
    GRU of 128) are stacked into padded rows (cell_lane._padded) for the per-sample products:
    the oracle's Fisher, nonzero."""
    monkeypatch.setattr(cell_lane, "_by_pairs", lambda *a: False)
    seen = []
    padded = cell_lane._padded

    def spy(ps):
        out = padded(ps)
        seen.append(out.stride(2) - out.shape[-1])
        return out

    monkeypatch.setattr(cell_lane, "_padded", spy)
    torch.manual_seed(3)
    cell = nn.LSTMCell(4, hidden) if kind == "lstm" else nn.GRUCell(4, hidden)
    case = _case(_Wide(cell), 4)
    want = oracle(case, quantity)
    assert all(v.abs().sum() > 0 for k, v in want.items() if k.startswith("c."))
    check_fast_twice(case, quantity, want, DET_REL_F64)
    assert seen and all(p == 8 for p in seen)
