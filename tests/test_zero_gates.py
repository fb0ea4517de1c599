"""A coupling of the samples behind a parameter that is entirely zero when the structure is probed.

The independence probes read one step's gradients: behind a zero factor (a residual branch's
BatchNorm weight initialised to zero, ``zero_init_residual``; a ReZero scalar; a zero-initialised
projection) a coupling of the samples sends no gradient and is not seen. Once the factor moves
(an optimiser step between two steps), the verdicts taken at zero must not be kept
(``fimfast/zero_gates.py``): every step is compared with the float64 oracle of that step's model
and batch (tests/adversarial.py), and the Kronecker representations refuse the coupled batch.
"""

from __future__ import annotations

import adversarial as adv
import kfac_brute
import pytest
import torch
from torch import nn

import fimfast
from fimfast.structured import FisherAccumulator
from fimfast.zero_gates import ZeroWatch

pytestmark = pytest.mark.filterwarnings("ignore")

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
DT = torch.float64
N, D, C = 4, 5, 3


def _batches(n: int = 4) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(N, D, generator=g, dtype=DT), torch.randint(0, C, (N,), generator=g))
            for _ in range(n)]


class _ZeroInitResidual(nn.Module):
    """``h + BN(f(h))`` with the BatchNorm's weight zero (torchvision's ``zero_init_residual``),
    in train mode (batch statistics: the samples coupled through the branch)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.f = nn.Linear(D, 6), nn.Linear(6, 6, bias=False)
        self.bn, self.o = nn.BatchNorm1d(6), nn.Linear(6, C)
        nn.init.zeros_(self.bn.weight)

    @property
    def gate(self):
        return self.bn.weight

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.o(h + self.bn(self.f(h)))


class _ReZero(nn.Module):
    """``h + g * (m - mean_batch(m))`` with a scalar gate ``g`` initialised to zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.f, self.o = nn.Linear(D, 6), nn.Linear(6, 6, bias=False), nn.Linear(6, C)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m = self.f(h)
        return self.o(h + self.gate * (m - m.mean(0)))


class _ZeroProjection(nn.Module):
    """``h + P(m - mean_batch(m))`` with a projection ``P`` initialised to zero (a LoRA ``B``, a
    zero convolution): every parameter in a layer the Kronecker representations take."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.f, self.o = nn.Linear(D, 6), nn.Linear(6, 6, bias=False), nn.Linear(6, C)
        self.p = nn.Linear(6, 6, bias=False)
        nn.init.zeros_(self.p.weight)

    @property
    def gate(self):
        return self.p.weight

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m = self.f(h)
        return self.o(h + self.p(m - m.mean(0)))


MODELS = {"zero_init_residual": _ZeroInitResidual, "rezero": _ReZero,
          "zero_projection": _ZeroProjection}


def _move(at: int):
    def before(i, model):
        if i == at:
            with torch.no_grad():
                model.gate.fill_(0.7)
    return before


@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_zero_gate_moved_after_a_step(name, at):
    """Before: the layers under the gate kept the first step's verdict (the samples apart), and
    EXACT was 87% (``inp.weight``) to 96% (``f.weight``) off the oracle from the moved step on."""
    for fim_type in TYPES:
        est, ref = adv.run(MODELS[name]().to(DT), _batches(), fim_type, before=_move(at))
        assert adv.nonzero(ref)
        assert adv.max_rel(est, ref) < 1e-10, fim_type


@pytest.mark.parametrize("name", list(MODELS))
def test_a_gate_that_stays_zero_keeps_the_plan(name):
    """A gate that stays zero changes nothing: every step exact, the gate watched throughout
    (the verdicts never dropped)."""
    model = MODELS[name]().to(DT)
    est, ref = adv.run(model, _batches(), "exact")
    assert adv.max_rel(est, ref) < 1e-10
    names = [n for n, p in model.named_parameters()]
    assert [names[i] for i in est._persample._zeros._at] == dict(
        zero_init_residual=["bn.weight", "bn.bias"], rezero=["gate"],
        zero_projection=["p.weight"])[name]


def test_the_watch_forgets_once_moved_and_holds_nothing_without_zeros():
    a, b = torch.zeros(3), torch.ones(2)
    w = ZeroWatch()
    w.note([a, b])
    assert w._at == [0] and not w.moved([a, b])
    a[1] = 1e-30  # its square underflows: the largest magnitude does not
    assert w.moved([a, b]) and not w.moved([a, b])  # told once, forgotten until the next note
    w.note([a, b])
    assert w._at == []
    w.note([torch.zeros(2), b])
    assert w.moved([torch.zeros(2), b, b])  # another list of parameters: dropped
    w.note([b, torch.full((2,), float("nan"))])
    assert w._at == []  # NaN is not zero


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
def test_kronecker_refuse_a_batch_once_the_gate_moved(rep):
    model = _ZeroProjection().to(DT)
    b1, b2 = _batches(2)
    acc = FisherAccumulator(model, "exact", rep, "sum")
    acc.update(b1)  # the gate at zero: no coupling on this batch
    before = acc.result().to_dense().clone()
    _move(0)(0, model)
    with pytest.raises(ValueError, match=r"module 'inp' .*reaches the output positions"):
        acc.update(b2)
    assert torch.equal(acc.result().to_dense(), before)
    with pytest.raises(ValueError, match=r"module 'inp' .*reaches the output positions"):
        fimfast.fisher(model, [b2], "exact", representation=rep)


def test_dense_follows_the_moved_gate():
    model = _ZeroProjection().to(DT)
    b1, b2 = _batches(2)
    acc = FisherAccumulator(model, "exact", "dense", "sum")
    acc.update(b1)
    want = kfac_brute.dense_exact(model, [b1[0]])
    _move(0)(0, model)
    acc.update(b2)
    want = want + kfac_brute.dense_exact(model, [b2[0]])
    assert float((acc.result().to_dense() - want).norm() / want.norm()) < 1e-10


class _LoraOverShift(nn.Module):
    """A LoRA branch (``B`` zero at initialisation) on the features rolled along the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.o = nn.Linear(D, 6), nn.Linear(6, C)
        self.A, self.B = nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.o(h + self.B(self.A(h.roll(1, 0))))


@pytest.mark.parametrize("rep", ["kfac", "quasi_diag"])
def test_a_second_fisher_call_after_lora_b_moved_is_refused(rep):
    """The verdicts are kept per model object across ``fimfast.fisher`` calls: the first call
    (``B`` zero: nothing crosses the samples) is exact, the call after ``B`` moved is refused
    (before: accepted, the quasi-diagonal's diagonal 0.75 off)."""
    model = _LoraOverShift().to(DT)
    b1, b2 = _batches(2)
    fimfast.fisher(model, [b1], "exact", representation=rep)
    with torch.no_grad():
        model.B.weight.normal_(generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"module 'inp' .*reaches the output positions"):
        fimfast.fisher(model, [b2], "exact", representation=rep)
