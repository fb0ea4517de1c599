"""The one-column step of plain Linear lanes (fimfast/persample/onecol.py) against the general
chunk path and a float64 oracle: the same sums bit for bit, in every case of folding, memory
budget, frozen weights or biases and ignored rows; taken only where its layout applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from cases import assert_same_estimators, empirical_oracle, lane_batches, lane_mlp

import fimfast
from fimfast.persample import onecol
from fimfast.persample import prepared as prepared_ps
from fimfast.persample.onecol import Lane


def _run(model, batches, general, monkeypatch, fim_type, **kw):
    """The estimator after ``batches`` and how many steps :func:`onecol.run` formed; with
    ``general``, no plan gets a layout (the general chunk path). The prepared step, which runs
    the same layouts from the second step on, is off here (tests/test_prepared_persample.py)."""
    runs = []
    with monkeypatch.context() as mp:
        mp.setattr(prepared_ps, "step", lambda est, batch: False)
        if general:
            mp.setattr(onecol, "layout", lambda plan: None)
        real = onecol.run

        def spy(*a):
            runs.append(1)
            return real(*a)

        mp.setattr(onecol, "run", spy)
        est = fimfast.DiagFisher(model, fim_type, seed=3, **kw)
        for b in batches:
            est.step(b)
    return est, len(runs)


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case", ["plain", "torch", "budget", "nobias", "frozen", "ignore", "conv1d", "conv1d_budget"]
)
def test_onecol_equals_the_general_path_and_the_oracle(monkeypatch, fim_type, dtype, case):
    kw = {"backend": "torch"} if case == "torch" else {}  # "torch": no folded products
    if case.endswith("budget"):  # no product kept for the state: the step forms each one
        monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.0001")
    if case.startswith("conv1d"):
        pytest.importorskip("transformers", reason="transformers is not installed")
    model = lane_mlp(dtype, bias=case != "nobias", conv1d=case.startswith("conv1d"))
    if case == "frozen":  # a lane of a bias alone
        model[2].weight.requires_grad_(False)
    batches = lane_batches(dtype, ignore=case == "ignore", k=3)
    ref, n_ref = _run(model, batches, True, monkeypatch, fim_type, **kw)
    est, n = _run(model, batches, False, monkeypatch, fim_type, **kw)
    assert (n_ref, n) == (0, 3)
    assert_same_estimators(est, ref)
    if fim_type != "empirical" or case == "frozen":
        return
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for v, w in zip(est.result().values(), empirical_oracle(model, batches)):
        torch.testing.assert_close(v.double(), w, rtol=tol, atol=tol * 1e-3)


def test_layout_reads_the_plan():
    """Each hidden Linear layer is one lane (its tap, weight and bias groups); the logits layer
    is in closed form; a frozen weight leaves a lane of its bias."""
    model = lane_mlp(torch.float32)
    est = fimfast.DiagFisher(model, "empirical", seed=3)
    x, y = lane_batches(torch.float32, k=3)[0]
    est.step((x, y))
    plan = est._persample.last_plan
    assert plan.lanes == (Lane(0, 0, 1), Lane(1, 2, 3))
    kinds = [str(g.kind) for g in plan.groups]
    for lane in plan.lanes:
        assert (kinds[lane.weight], kinds[lane.bias]) == ("outer", "vec")
        assert plan.groups[lane.weight].members[0][0] is plan.groups[lane.bias].members[0][0]
    model[2].weight.requires_grad_(False)
    est = fimfast.DiagFisher(model, "empirical", seed=3)
    est.step((x, y))
    lanes = est._persample.last_plan.lanes
    assert [(la.weight is None, la.bias is None) for la in lanes] == [(False, False), (True, False)]


def test_other_layers_and_several_columns_take_the_general_chunks(monkeypatch):
    """A layer that is no Linear lane (a convolution) and a step of several columns (EXACT, two
    draws of MONTE_CARLO) keep the general chunks."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(5, 2, 6), torch.randint(0, 4, (5,))
    est, n = _run(conv, [(x, y)], False, monkeypatch, "empirical")
    assert n == 0 and est._persample.last_plan.lanes is None
    for fim_type, kw in (("exact", {}), ("monte_carlo", {"num_probes": 2})):
        est, n = _run(lane_mlp(torch.float32), lane_batches(torch.float32, k=3), False, monkeypatch,
                      fim_type, **kw)
        assert n == 0 and est._persample.last_plan.lanes is not None


@pytest.mark.parametrize("budget", [None, "0.0001"])
def test_missing_gradients_run_the_general_chunk(monkeypatch, budget):
    """Where a tap got no gradient, the general chunk code forms the squares of the same
    gradients: forced here on complete gradients, the result is the general path's (products
    kept for the state, or formed at the end of the step within a small memory budget)."""
    if budget:
        monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", budget)
    batches = lane_batches(torch.float32, k=3)
    ref, _ = _run(lane_mlp(torch.float32), batches, True, monkeypatch, "empirical")
    monkeypatch.setattr(onecol, "_complete", lambda grads: False)
    est, n = _run(lane_mlp(torch.float32), batches, False, monkeypatch, "empirical")
    assert n == 3
    assert_same_estimators(est, ref)
