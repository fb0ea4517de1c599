"""A parameter used by several calls through one elementwise function of it (a pruned Linear
called twice, ``W * mask`` or ``W.exp()`` fed to two ``F.linear`` calls): one derivative
``chain`` for all its uses (fimfast/hooks.py ``Use.chain``), so its per-sample gradient is
``chain * sum`` of the calls' terms and the rules take it (fimfast/persample/plan.py
``groups_of``). Uses with different chains, or mixed with uses of the parameter itself, take the
generic path (exact), also when a plan made while the chains agreed meets a step where they do
not. Every result is checked against the float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from cases import check_fast_twice, classifier_case, run_case
from oracle import oracle, rel_error
from tolerances import DET_REL_F64
from torch import nn

N, D, C = 5, 4, 3
COMBINE = "its uses cannot be combined by the rules"


class Twice(nn.Module):
    """``o(tanh(f(tanh(f(x)))))`` with ``f`` a pruned Linear, or ``F.linear`` of ``W`` through
    ``how``: ``"mask"`` (``W * m`` made once), ``"exp"`` (``W.exp()`` made per call),
    ``"two_masks"`` (``W * m`` then ``W * m2``), ``"mixed"`` (``W`` then ``W * m``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.o = how, nn.Linear(D, C)
        g = torch.Generator().manual_seed(3)
        if how == "pruned":
            self.a = nn.Linear(D, D)
            torch.nn.utils.prune.l1_unstructured(self.a, "weight", amount=0.4)
        else:
            self.W = nn.Parameter(torch.randn(D, D, generator=g) * 0.5)
            self.register_buffer("m", (torch.rand(D, D, generator=g) > 0.3).double())
            self.register_buffer("m2", self.m.clone())

    def _w(self, k: int):
        if self.how == "exp":
            return self.W.exp() * 0.3
        if self.how == "mixed" and k == 0:
            return self.W
        return self.W * (self.m2 if self.how == "two_masks" and k == 1 else self.m)

    def forward(self, x):
        if self.how == "pruned":
            h = torch.tanh(self.a(torch.tanh(self.a(x))))
        elif self.how == "mask":
            w = self.W * self.m
            h = torch.tanh(F.linear(torch.tanh(F.linear(x, w)), w))
        else:
            h = torch.tanh(F.linear(torch.tanh(F.linear(x, self._w(0))), self._w(1)))
        return self.o(h)


def _case(how: str):
    torch.manual_seed(0)
    model = Twice(how).double()
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    return classifier_case(model, (x, y), C, how)


def _name(how: str) -> str:
    return "a.weight_orig" if how == "pruned" else "W"


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("how", ["pruned", "mask", "exp"])
def test_one_chain_over_several_calls_takes_the_rules(how, quantity):
    case = _case(how)
    ref = oracle(case, quantity)
    assert ref[_name(how)].abs().sum() > 0  # the oracle's Fisher of the parameter is not zero
    check_fast_twice(case, quantity, ref, DET_REL_F64)


@pytest.mark.parametrize("how", ["two_masks", "mixed"])
def test_different_chains_take_the_generic_path(how):
    case = _case(how)
    model = case.model
    if how == "two_masks":
        model.m2[0, :2] = 1 - model.m2[0, :2]  # a different mask
    got, est = run_case(case, "exact")
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    plan = est._persample.last_plan
    names = [n for n, _ in model.named_parameters()]
    assert {names[i]: plan.reasons[i] for i in plan.generic} == {"W": COMBINE}


def test_plan_made_while_chains_agree_is_not_reused_when_they_differ():
    """``m2`` equals ``m`` in the first step (one chain: the rules) and not in the second (the
    generic path): the sum of the two steps is the sum of the two oracles."""
    case = _case("two_masks")
    model = case.model
    first = oracle(case, "exact")
    from fimfast import DiagFisher

    est = DiagFisher(model, "exact", likelihood="categorical")
    est.step(case.batch)
    assert not est._persample.last_plan.generic
    model.m2[1, :3] = 1 - model.m2[1, :3]
    second = oracle(case, "exact")
    est.step(case.batch)
    assert est._persample.last_plan.generic  # W: its chains differ now
    assert rel_error(dict(est.result().items()), {k: first[k] + second[k] for k in first}) <= (
        DET_REL_F64)
