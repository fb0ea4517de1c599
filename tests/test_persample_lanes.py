"""Shortcuts of the per-sample engine's hot path, each against the float64 oracle and against the
path it replaces.

* ``fimfast.persample.squares.linear_lane``: the squares of ``nn.Linear`` / Hugging Face
  ``Conv1D`` without weight sharing, for a chunk of columns, straight from the output gradient
  (several columns: the weight's squares summed in place, the bias read from them at the end);
* ``fimfast.rules.norm.LayerNormRule.xhat``: the normalised input by torch's kernel with a unit
  weight (the same values as the kernel without the affine);
* ``fimfast.hooks.Capture.uses_of``: a Linear call's uses kept across steps of one parameter set.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import classifier_case
from oracle import oracle_flat, rel_error, row_jacobians
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast.persample import onecol, squares
from fimfast.rules.norm import LayerNormRule


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "hf_conv1d":
        pytest.importorskip("transformers", reason="transformers is not installed")
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(6, 7), nn.ReLU(), nn.Linear(6, 4))
    if kind == "no_bias":
        return nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 4))
    if kind == "tokens":  # (N, T, d) inputs: the weight is shared over tokens (no lane)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Flatten(), nn.Linear(21, 4))
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    shape = (6, 3, 5) if kind == "tokens" else (6, 5)
    return (torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (6,), generator=g))


def _lane_spy(monkeypatch, enabled: bool = True) -> list[str]:
    taken: list[str] = []
    real = squares.linear_lane

    def lane(g, gmap, acc, lanes, sq=None):
        done = enabled and real(g, gmap, acc, lanes, sq)
        if done:
            taken.append(str(g.kind))
        return done

    monkeypatch.setattr(squares, "linear_lane", lane)
    return taken


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("kind", ["mlp", "hf_conv1d", "no_bias", "tokens"])
def test_linear_lane_matches_the_oracle_and_the_terms(monkeypatch, kind, fim_type):
    # the general chunk of one column (the straight one-column step, fimfast/persample/onecol.py,
    # forms the same squares: tests/test_onecol.py)
    monkeypatch.setattr(onecol, "layout", lambda plan: None)
    model = _model(kind).double()
    batch = _batch(kind)
    taken = _lane_spy(monkeypatch)
    est = fimfast.DiagFisher(model, fim_type, seed=4)
    est.step(batch)
    got = dict(est.result())
    assert not est._persample.last_plan.generic
    # every hidden layer's weight and bias (the logits layer is in closed form); none when the
    # weight is shared over tokens
    want = {"mlp": 4, "hf_conv1d": 4, "no_bias": 1, "tokens": 0}[kind]
    assert len(taken) == want, taken
    off = _lane_spy(monkeypatch, enabled=False)
    ref = fimfast.DiagFisher(model, fim_type, seed=4)
    ref.step(batch)
    assert not off
    assert rel_error(got, dict(ref.result())) <= DET_REL_F64
    if fim_type == "empirical":
        rj = row_jacobians(classifier_case(model, batch, 4, "lanes"))
        assert rel_error(got, rj.split(oracle_flat(rj, "categorical", "empirical"))) <= DET_REL_F64


@pytest.mark.parametrize("fim_type,kw", [("monte_carlo", {"num_probes": 2}),
                                         ("exact", {"class_chunk": 2}),
                                         ("exact", {"class_chunk": 10**6})])
def test_linear_lane_takes_several_columns(monkeypatch, fim_type, kw):
    """Several columns per backward (two draws; EXACT's 3 columns in chunks of 2, or in one
    backward): each chunk's squares are summed into the weight's ``S`` in place and the bias
    reads ``sum_n S_n`` at the end of the step; equal to the generic path."""
    model = _model("mlp").double()
    batch = _batch("mlp")
    taken = _lane_spy(monkeypatch)
    est = fimfast.DiagFisher(model, fim_type, seed=4, **kw)
    est.step(batch)
    chunks = 2 if kw.get("class_chunk") == 2 else 1
    assert sorted(taken) == sorted(["outer", "vec"] * 2 * chunks), taken
    lanes = [g for g in est._persample.last_plan.groups if str(g.kind) == "vec"]
    assert lanes and all(g.state.partner for g in lanes)  # biases read from their weights
    ref = fimfast.DiagFisher(model, fim_type, seed=4, **kw)
    ref._persample.use_rules = False
    ref.step(batch)
    assert rel_error(dict(est.result()), dict(ref.result())) <= DET_REL_F64
    rj = row_jacobians(classifier_case(model, batch, 4, "lanes"))
    if fim_type == "exact":
        want = rj.split(oracle_flat(rj, "categorical", "exact"))
        assert rel_error(dict(est.result()), want) <= DET_REL_F64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,norm",
                         [((4, 6, 8), (8,)), ((3, 5, 4, 6), (4, 6)), ((7, 13), (13,))])
def test_layer_norm_xhat_is_the_kernel_without_affine(dtype, shape, norm):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype)
    module = nn.LayerNorm(norm, eps=1e-3)
    got = LayerNormRule().xhat(module, x, {})
    want = F.layer_norm(x, norm, None, None, 1e-3)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_layer_norm_rule_matches_the_oracle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4)).double()
    batch = _batch("mlp")
    est = fimfast.DiagFisher(model, "empirical")
    est.step(batch)
    assert not est._persample.last_plan.generic
    rj = row_jacobians(classifier_case(model, batch, 4, "lanes"))
    ref = rj.split(oracle_flat(rj, "categorical", "empirical"))
    assert rel_error(dict(est.result()), ref) <= DET_REL_F64


def test_uses_kept_across_steps_follow_a_replaced_weight():
    """A Linear call's uses are built once per parameter set and reused (``Capture.uses_of``):
    a weight replaced between steps by a new parameter of the same shape (same names, same
    state) is the one the next step estimates, exactly as a new estimator does."""
    model = _model("mlp").double()
    batch = _batch("mlp")
    est = fimfast.DiagFisher(model, "empirical", seed=4)
    est.step(batch)
    with torch.no_grad():
        model[2].weight = nn.Parameter(model[2].weight * 3.0 + 0.1)
    est.reset()
    est.step(batch)
    assert not est._persample.last_plan.generic
    ref = fimfast.DiagFisher(model, "empirical", seed=4)
    ref.step(batch)
    got, want = dict(est.result()), dict(ref.result())
    assert rel_error(got, want) <= DET_REL_F64
    rj = row_jacobians(classifier_case(model, batch, 4, "lanes-replaced"))
    assert rel_error(got, rj.split(oracle_flat(rj, "categorical", "empirical"))) <= DET_REL_F64
