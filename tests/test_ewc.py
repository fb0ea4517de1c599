"""fimfast.EWC: penalty and gradient against hand-computed values, online EWC, adapters only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast
from fimfast.ewc import EWC


def _linear(w, b) -> nn.Linear:
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w], dtype=torch.float64))
        lin.bias.copy_(torch.tensor([b], dtype=torch.float64))
    return lin


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_penalty_and_gradient_by_hand():
    lin = _linear([1.0, 2.0], 0.5)
    F = fimfast.DiagFIM({"weight": _t([2.0, 3.0]), "bias": _t(4.0)})
    anchor = {"weight": _t([0.0, 1.0]), "bias": _t(0.0)}
    ewc = EWC(lin, F, anchor, lam=2.0)
    pen = ewc()
    # lam/2 * (2*1^2 + 3*1^2 + 4*0.5^2) = 1 * 6
    assert pen.item() == pytest.approx(6.0, abs=1e-12)
    pen.backward()
    # d/dtheta = lam * F * (theta - anchor)
    assert torch.allclose(lin.weight.grad, _t([4.0, 6.0]))
    assert torch.allclose(lin.bias.grad, _t([4.0]))


def test_default_anchor_is_a_copy_of_the_parameters():
    lin = _linear([1.0, 2.0], 0.5)
    F = {"weight": _t([2.0, 3.0]), "bias": _t(4.0)}
    ewc = EWC(lin, F, lam=10.0)
    assert ewc().item() == 0.0
    with torch.no_grad():
        lin.weight += 1.0  # anchor stays at the old values
    # 5 * (2 + 3) = 25
    assert ewc().item() == pytest.approx(25.0, abs=1e-12)


def test_one_term_per_task_and_online_ewc():
    F1 = {"weight": _t([2.0, 3.0]), "bias": _t(4.0)}
    F2 = {"weight": _t([1.0, 1.0]), "bias": _t(0.0)}
    a1 = {"weight": _t([0.0, 1.0]), "bias": _t(0.0)}
    a2 = {"weight": _t([1.0, 0.0]), "bias": _t(1.0)}
    lin = _linear([1.0, 2.0], 0.5)  # theta - a1 = (1, 1 | 0.5); theta - a2 = (0, 2 | -0.5)

    ewc = EWC(lin, F1, a1, lam=2.0)
    ewc.consolidate(F2, a2)
    assert ewc.num_terms == 2
    # term 1: 6 (above); term 2: 1 * (1*0 + 1*4 + 0*0.25) = 4
    assert ewc().item() == pytest.approx(10.0, abs=1e-12)

    online = EWC(lin, F1, a1, lam=2.0, gamma=0.5)
    online.consolidate(F2, a2)
    assert online.num_terms == 1
    # F* = 0.5 * F1 + F2 = (2, 2.5 | 2), anchor a2: 2*0 + 2.5*4 + 2*0.25 = 10.5
    assert online().item() == pytest.approx(10.5, abs=1e-12)
    assert torch.allclose(online.fisher()["weight"], _t([2.0, 2.5]))
    assert torch.equal(online.anchor()["bias"], _t(1.0))
    online().backward()
    assert torch.allclose(lin.weight.grad, 2.0 * _t([2.0, 2.5]) * _t([0.0, 2.0]))


class LoRALinear(nn.Module):
    """A frozen base weight plus a trainable low-rank update ``B @ A``."""

    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.B.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


def test_only_trainable_parameters_are_penalised():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(6, 8, 2), nn.Tanh(), LoRALinear(8, 3, 2))
    x = torch.randn(32, 6)
    F = fimfast.diag_fisher(model, [(x,)], "exact", reduction="mean")
    assert sorted(F) == ["0.A.weight", "0.B.weight", "2.A.weight", "2.B.weight"]
    ewc = EWC(model, F, lam=3.0)
    assert ewc.names == list(F)
    sd = ewc.state_dict()  # only the adapters' Fisher and anchor, never the frozen base
    assert len(sd) == 2 * 4 and all("base" not in k for k in sd)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    pen = ewc()
    expected = 1.5 * sum(float((F[n] * 0.01).sum()) for n in F)
    assert pen.item() == pytest.approx(expected, rel=1e-5)
    pen.backward()
    assert model[0].base.weight.grad is None
    assert torch.allclose(model[0].A.weight.grad, 3.0 * F["0.A.weight"] * 0.1, rtol=1e-5)


def test_a_fisher_with_frozen_parameters_is_restricted():
    lin = _linear([1.0, 2.0], 0.5)
    lin.bias.requires_grad_(False)
    ewc = EWC(lin, {"weight": _t([1.0, 3.0]), "bias": _t(1.0)}, lam=2.0)
    assert ewc.names == ["weight"]
    with torch.no_grad():
        lin.weight += _t([1.0, 2.0])
        lin.bias += 5.0  # frozen: not penalised, whatever its Fisher
    # lam/2 * (1 * 1^2 + 3 * 2^2) = 13
    pen = ewc()
    assert pen.item() == pytest.approx(13.0, abs=1e-12)
    pen.backward()
    assert torch.allclose(lin.weight.grad, _t([[2.0, 12.0]])) and lin.bias.grad is None
    with pytest.raises(ValueError, match="strict=True"):  # the bias is trainable, not in F
        EWC(nn.Linear(2, 1).double(), {"weight": _t([1.0, 1.0])}, strict=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fisher": {"nope": torch.zeros(1)}}, "no parameter 'nope'"),
        ({"fisher": {"weight": torch.zeros(3)}}, r"shape \(1, 2\)"),
        ({"fisher": {"weight": -torch.ones(1, 2)}}, "negative"),
        ({"fisher": {"weight": torch.ones(1, 2)}, "lam": -1.0}, "lam must be"),
        ({"fisher": {"weight": torch.ones(1, 2)}, "gamma": 1.5}, "gamma must be in"),
        ({"fisher": {"weight": torch.ones(1, 2)}, "anchor": {"weight": torch.ones(2)}}, "anchor"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWC(nn.Linear(2, 1), **kwargs)


def test_moves_with_the_model_dtype():
    lin = nn.Linear(2, 1).to(torch.bfloat16)
    ewc = EWC(lin, {"weight": torch.ones(1, 2), "bias": torch.ones(1)}, lam=1.0)
    assert ewc.fisher()["weight"].dtype == torch.float32  # float32 state for bf16 parameters
    with torch.no_grad():
        lin.weight += 1.0
    assert ewc().dtype == torch.float32 and ewc().item() == pytest.approx(2 * 0.5, rel=1e-2)
