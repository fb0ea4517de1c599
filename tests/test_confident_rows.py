"""Confident rows end to end: a float32 classifier whose top logit leads the others by about 20
(``1 - max p`` about 1e-8, within a few hundred ulps of 1 in float32). The output-side factors
(the score ``p_y - 1`` at the label, HUTCHINSON's entry of the leading class, the EXACT columns'
``sqrt(p) (1 - p)``) form ``1 - p`` of the leading class from the other classes' exponentials, so
the float32 diagonal equals the same estimator run in float64 (the same signs and draws: every
generator is counter-based) to float32 rounding. Formed as differences of numbers near 1 they
kept none of their relative accuracy (errors of 100% and more)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fimfast

TYPES = ["empirical", "monte_carlo", "hutchinson", "hutchinson_sqrt", "exact"]
TOL = 2e-5  # measured 2e-6 and less (float32 rounding); the old formulas: 6e-4 to 1


def _model(lead: int, C: int = 5) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, C))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model[2].bias[lead] += 20.0  # every row confident in class `lead`
    return model


def _batch(lead: int, N: int = 7):
    g = torch.Generator().manual_seed(4)
    return torch.randn(N, 6, generator=g), torch.full((N,), lead, dtype=torch.int64)


def _diag(model, batch, fim_type, rules=True):
    est = fimfast.DiagFisher(model, fim_type, seed=11)
    est._persample.use_rules = rules
    est.step(batch)
    return {k: v.detach() for k, v in est.result().items()}


def _worst(got: dict, ref: dict) -> float:
    """The largest error over the parameters, each relative to its own largest entry."""
    return max(float((got[k].double() - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)


@pytest.mark.parametrize("rules", [True, False], ids=["rules", "generic"])
@pytest.mark.parametrize("lead", [0, 4], ids=["lead-first", "lead-last"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_confident_float32_equals_float64(fim_type, lead, rules):
    model = _model(lead)
    x, y = _batch(lead)
    z = model(x).detach().double()
    top2 = z.topk(2, -1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > 15).all()), "every row must be confident"
    p = torch.softmax(z, -1)
    assert float((1 - p.max(-1).values).max()) < 500 * torch.finfo(torch.float32).eps
    ref = _diag(copy.deepcopy(model).double(), (x.double(), y), fim_type, rules)
    # the oracle is not vacuous: every parameter has a nonzero Fisher
    assert all(float(v.abs().max()) > 0 for v in ref.values())
    got = _diag(model, (x, y), fim_type, rules)
    assert _worst(got, ref) <= TOL, f"{fim_type}: error {_worst(got, ref):.3g}"
