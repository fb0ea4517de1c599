"""``torch.gru_cell``, ``torch.lstm_cell``, ``torch.rnn_tanh_cell`` and ``torch.rnn_relu_cell``
called directly on parameters in a hand-written loop (fimfast/functional_cells.py): the rules'
path against the float64 oracle (tests/oracle.py) for EXACT, EMPIRICAL and MONTE_CARLO, the
forward equal to torch's bit for bit, a masked weight (one chain over every step), a cell
subclass with its own forward, and the calls left to torch's own function (generic path)."""

from __future__ import annotations

import pytest
import torch
from cases import check_fast_twice, check_monte_carlo_same_seed, classifier_case, run_case
from oracle import oracle, rel_error, row_jacobians
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn

N, I, H, C, T = 5, 4, 5, 3, 4
FUNCS = {"gru": (torch.gru_cell, 3), "lstm": (torch.lstm_cell, 4),
         "tanh": (torch.rnn_tanh_cell, 1), "relu": (torch.rnn_relu_cell, 1)}
ROLES = ("w_ih", "w_hh", "b_ih", "b_hh")


class Recurrence(nn.Module):
    """``h = cell(x_t, h, W_ih, W_hh, b_ih, b_hh)`` over ``T`` steps, then a Linear on the last
    state; ``how``: ``"plain"``, ``"nobias"``, ``"masked"`` (``W_ih * mask`` made once before
    the loop) or ``"one_by_one"`` (one sample at a time, ``(1, I)`` inputs)."""

    def __init__(self, kind: str, how: str = "plain"):
        super().__init__()
        self.func, g = FUNCS[kind]
        self.kind, self.how, self.o = kind, how, nn.Linear(H, C)
        self.w_ih = nn.Parameter(torch.randn(g * H, I) * 0.5)
        self.w_hh = nn.Parameter(torch.randn(g * H, H) * 0.5)
        if how != "nobias":
            self.b_ih = nn.Parameter(torch.randn(g * H) * 0.3)
            self.b_hh = nn.Parameter(torch.randn(g * H) * 0.3)
        else:
            self.b_ih = self.b_hh = None
        self.register_buffer("mask", (torch.rand(g * H, I) > 0.3).float())
        self.last = None

    def _run(self, xs, w_ih):
        h = xs[0].new_zeros(*xs[0].shape[:-1], H)
        s = (h, torch.zeros_like(h)) if self.kind == "lstm" else h
        for xt in xs:
            s = self.func(xt, s, w_ih, self.w_hh, self.b_ih, self.b_hh)
        return s[0] if self.kind == "lstm" else s

    def forward(self, x):
        w_ih = self.w_ih * self.mask if self.how == "masked" else self.w_ih
        if self.how == "one_by_one":
            h = torch.cat([self._run(xn.unsqueeze(0).unbind(1), w_ih) for xn in x])
        else:
            h = self._run(x.unbind(1), w_ih)
        self.last = h.detach()
        return self.o(h)


def _case(kind: str, how: str = "plain", dtype=torch.float64):
    torch.manual_seed(2)
    model = Recurrence(kind, how).to(dtype)
    x = torch.randn(N, T, I, generator=torch.Generator().manual_seed(9), dtype=dtype)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    return classifier_case(model, (x, y), C, f"{kind}_{how}")


def _nonzero(case, quantity: str) -> dict:
    ref = oracle(case, quantity)
    for r in ROLES:  # the oracle's Fisher of every cell parameter is not zero
        if r in ref:
            assert ref[r].abs().sum() > 0, r
    return ref


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("how", ["plain", "nobias", "masked"])
@pytest.mark.parametrize("kind", sorted(FUNCS))
def test_cell_function_takes_the_rule_and_matches_the_oracle(kind, how, quantity):
    case = _case(kind, how)
    check_fast_twice(case, quantity, _nonzero(case, quantity), DET_REL_F64)


@pytest.mark.parametrize("kind", sorted(FUNCS))
def test_cell_function_monte_carlo_same_seed(kind):
    est = check_monte_carlo_same_seed(_case(kind), row_jacobians(_case(kind)), DET_REL_F64)
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("kind", sorted(FUNCS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_is_torch_cell_bit_for_bit(kind, dtype):
    case = _case(kind, dtype=dtype)
    with torch.no_grad():
        case.model(case.batch[0])
    want = case.model.last.clone()
    got, est = run_case(case, "exact")
    assert not est._persample.last_plan.generic
    assert torch.equal(case.model.last, want)
    if dtype == torch.float32:
        assert rel_error(got, oracle(case, "exact")) <= DET_REL_F32


class OwnForwardGRUCell(nn.GRUCell):
    """A GRUCell subclass whose forward calls ``torch.gru_cell`` on a scaled input."""

    def forward(self, x, h):
        return torch.gru_cell(2.0 * x, h, self.weight_ih, self.weight_hh, self.bias_ih,
                              self.bias_hh)


class SubclassLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.o = OwnForwardGRUCell(I, H), nn.Linear(H, C)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        for xt in x.unbind(1):
            h = self.c(xt, h)
        return self.o(h)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_cell_subclass_with_its_own_forward_takes_the_rule(quantity):
    torch.manual_seed(4)
    model = SubclassLoop().double()
    x = torch.randn(N, T, I, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    case = classifier_case(model, (x, y), C, "subclass")
    ref = oracle(case, quantity)
    assert all(ref[f"c.{r}"].abs().sum() > 0 for r in ("weight_ih", "weight_hh", "bias_hh"))
    check_fast_twice(case, quantity, ref, DET_REL_F64)


def test_calls_one_sample_at_a_time_take_the_generic_path():
    """One sample at a time: no dim of the calls' outputs is the batch; the generic path,
    exact."""
    case = _case("gru", "one_by_one")
    got, est = run_case(case, "exact")
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    names = [n for n, _ in case.model.named_parameters()]
    assert {names[i] for i in est._persample.last_plan.generic} == set(ROLES)
