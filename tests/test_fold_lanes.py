"""The squares of a prepared one-column step folded into the state by the extension's
``fold_lanes`` (csrc/fold_lanes.cpp, fimfast/persample/lanes.py): the same sums bit for bit as
the Python path (an extension without the function) and the general path, the float64 oracle
met; the cases it does not take (memory budget, a first commit, a state averaged) go the Python
way; and the function itself declines, writing nothing, what is not its plain case."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from cases import assert_same_estimators, empirical_oracle, lane_batches, lane_mlp

import fimfast
from fimfast import _ext
from fimfast.persample import lanes
from fimfast.persample import prepared as pp

FOLD = _ext.host_function("fold_lanes")
PREPARED = _ext.host_function("walk_holds") is not None
needs_fold = pytest.mark.skipif(FOLD is None or not PREPARED,
                                reason="the extension has no fold_lanes")


def _run(model, batches, monkeypatch, way, fim_type="empirical", **kw):
    """The estimator after ``batches`` on a copy of ``model`` and the calls of ``fold_lanes``
    that took their lanes; ``way``: ``fold`` (the extension's), ``python`` (an extension without
    fold_lanes) or ``general`` (no prepared step)."""
    model = copy.deepcopy(model)
    took = []
    with monkeypatch.context() as mp:
        if way == "general":
            mp.setattr(pp, "step", lambda est, batch: False)
        host = None if way == "python" else FOLD

        def spy(*a):
            r = host(*a)
            took.append(r)
            return r

        mp.setattr(lanes, "_HOST", [None if host is None else spy])
        est = fimfast.DiagFisher(model, fim_type, seed=3, **kw)
        for b in batches:
            est.step(b)
    return est, took


@needs_fold
@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain", "nobias", "frozen_w", "frozen_b", "conv1d"])
def test_the_fold_equals_the_python_and_general_paths(monkeypatch, fim_type, dtype, case):
    if case == "conv1d":
        pytest.importorskip("transformers", reason="transformers is not installed")
    model = lane_mlp(dtype, bias=case != "nobias", conv1d=case == "conv1d")
    if case == "frozen_w":
        model[2].weight.requires_grad_(False)
    if case == "frozen_b":
        model[2].bias.requires_grad_(False)
        model[4].bias.requires_grad_(False)
    batches = lane_batches(dtype)
    est, took = _run(model, batches, monkeypatch, "fold", fim_type)
    py, none = _run(model, batches, monkeypatch, "python", fim_type)
    gen, _ = _run(model, batches, monkeypatch, "general", fim_type)
    # the first step is general (and its commit adopts the estimate), the others prepared
    assert took == [True, True, True] and none == []
    assert_same_estimators(est, py)
    assert_same_estimators(est, gen)
    if fim_type == "empirical":
        want = empirical_oracle(model, batches)
        assert all(w.abs().sum() > 0 for w in want)  # no parameter left out of the graph
        for got, w in zip(est.result().values(), want):
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got.double(), w, rtol=tol, atol=tol * w.abs().max())


@needs_fold
def test_what_the_fold_does_not_take_goes_the_python_way(monkeypatch):
    model, batches = lane_mlp(), lane_batches(k=5)
    # a memory budget below the products: the step forms each one itself
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.0001")
    est, took = _run(model, batches, monkeypatch, "fold")
    gen, _ = _run(model, batches, monkeypatch, "general")
    assert took == []
    assert_same_estimators(est, gen)
    monkeypatch.delenv("FIMFAST_MEMORY_BUDGET_MB")
    # an averaged state adds no kept product: the lanes are formed for it
    est, took = _run(model, batches, monkeypatch, "fold", ema=0.9)
    gen, _ = _run(model, batches, monkeypatch, "general", ema=0.9)
    assert took == []
    assert_same_estimators(est, gen)
    # the torch backend keeps no product for the state
    est, took = _run(model, batches, monkeypatch, "fold", backend="torch")
    assert took == []


@needs_fold
def test_a_reset_state_takes_the_first_estimate_then_the_fold(monkeypatch):
    model, batches = lane_mlp(), lane_batches(k=4)
    est, took = _run(model, batches[:2], monkeypatch, "fold")
    gen, _ = _run(model, batches[:2], monkeypatch, "general")
    calls = []
    with monkeypatch.context() as mp:
        mp.setattr(lanes, "_HOST", [lambda *a: calls.append(1) or FOLD(*a)])
        est.reset()
        for b in batches[2:]:
            est.step(b)
    with monkeypatch.context() as mp:
        mp.setattr(pp, "step", lambda est, batch: False)
        gen.reset()
        for b in batches[2:]:
            gen.step(b)
    assert took == [True] and len(calls) == 1  # the first commit after the reset adopts
    assert_same_estimators(est, gen)


def _operands(dt=torch.float32):
    g = torch.Generator().manual_seed(0)
    G = [torch.randn(5, 3, generator=g, dtype=dt), torch.randn(5, 4, generator=g, dtype=dt)]
    A = [torch.randn(5, 4, generator=g, dtype=dt), None]
    values = [torch.rand(3, 4, generator=g, dtype=dt), torch.rand(3, generator=g, dtype=dt),
              torch.rand(4, generator=g, dtype=dt)]
    return values, G, A, [0, -1], [1, 2], [False, False]


@pytest.mark.skipif(FOLD is None, reason="the extension has no fold_lanes")
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_the_function_runs_torchs_operators(dt):
    values, G, A, W, B, T = _operands(dt)
    want = [v.clone() for v in values]
    S0, S1 = G[0].square(), G[1].square()
    want[1].add_(S0.sum(0))
    want[2].add_(S1.sum(0))
    want[0].addmm_(S0.t(), A[0].square())
    assert FOLD(values, G, A, W, B, T)
    for v, w in zip(values, want):
        assert torch.equal(v, w)
    # transposed: (A^2)^T S into a value stored (in, out); squares in the value's dtype
    v = torch.rand(4, 3, dtype=torch.float64)
    w = v.clone().addmm_(A[0].double().square().t(), G[0].double().square())
    assert FOLD([v], [G[0]], [A[0]], [0], [-1], [True])
    assert torch.equal(v, w)


@pytest.mark.skipif(FOLD is None, reason="the extension has no fold_lanes")
def test_the_function_declines_writing_nothing():
    def declined(change):
        values, G, A, W, B, T = _operands()
        args = change([values, G, A, W, B, T])
        before = [v.clone() for v in args[0]]
        assert FOLD(*args) is False
        assert all(torch.equal(v, b) for v, b in zip(args[0], before))

    declined(lambda a: [a[0], a[1], a[2], [0, 1], [1, 2], a[5]])  # one slot twice
    declined(lambda a: [a[0], a[1], a[2], [0, -1], [1, 7], a[5]])  # a slot out of range
    declined(lambda a: [a[0], [a[1][0].unsqueeze(0), a[1][1]], *a[2:]])  # a 3-D side
    declined(lambda a: [a[0], a[1], [a[2][0][:4], None], *a[3:]])  # rows differ
    declined(lambda a: [a[0], a[1], [None, None], *a[3:]])  # a weight without its input side
    declined(lambda a: [[a[0][0].t(), a[0][1], a[0][2]], *a[1:]])  # a value not contiguous
    declined(lambda a: [[a[0][0], a[0][1][:2], a[0][2]], *a[1:]])  # a sum of another size
    declined(lambda a: [[a[0][0].half(), *a[0][1:]], *a[1:]])  # a value in float16
    declined(lambda a: [*a[:5], [False]])  # entries of different lengths
    p = nn.Parameter(torch.zeros(3, 4))
    declined(lambda a: [[p, *a[0][1:]], *a[1:]])  # a value that requires grad
