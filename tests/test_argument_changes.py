"""An operation's argument changed between two steps, its type and the model's modules the same.

The per-sample engine and the structured passes keep per graph shape what they proved on a first
step (which layers keep the samples apart, the plans). The shape holds, beside the types of the
graph's nodes, the constants each node keeps for its backward (a dimension, a scalar type, a
Python scalar; the extension's walk: csrc/tap_walk.cpp, the Python walk:
``fimfast.persample.walk.shape``): a cumulative sum, a softmax or a mean turned from the positions
to the batch after a step makes another structure, probed again. Every step is compared with the
float64 oracle of that step's model and batch (tests/adversarial.py), and the structured
representations refuse the coupled step.
"""

from __future__ import annotations

import adversarial as adv
import kfac_brute
import pytest
import torch
from torch import nn

import fimfast
from fimfast.persample import walk as graph_walk
from fimfast.structured import FisherAccumulator

pytestmark = pytest.mark.filterwarnings("ignore")

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson"]
DT = torch.float64
N, T, D, C = 4, 5, 6, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(n: int = 4) -> list:
    return [(torch.randn(N, T, D, generator=_gen(10 + i), dtype=DT),
             torch.randint(0, C, (N,), generator=_gen(20 + i))) for i in range(n)]


class _Mixer(nn.Module):
    """A hidden layer, an operation over ``self.dim`` (the positions, 1, or the batch, 0) whose
    type stays when its argument changes, and a head averaged over the positions."""

    def __init__(self, op: str):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.o, self.op, self.dim = nn.Linear(D, D), nn.Linear(D, C), op, 1
        self.scale, self.shift = 1.0, 0

    def forward(self, x):
        h = torch.tanh(self.l(x))
        if self.op == "cumsum":
            h = h.cumsum(self.dim)
        elif self.op == "softmax":
            h = torch.softmax(h, self.dim)
        elif self.op == "center":
            h = h - h.mean(self.dim, keepdim=True)
        elif self.op == "roll":
            h = h.roll(1, self.dim)
        elif self.op == "scale":
            h = h * self.scale
        elif self.op == "shift":  # a roll along the batch by a shift that may be drawn 0
            h = h + 0.5 * h.roll(self.shift, 0)
        return self.o(h).mean(1)


def _to_batch(model) -> None:
    model.dim = 0


OPS = ["cumsum", "softmax", "center", "roll"]


@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("op", OPS)
def test_a_dimension_turned_to_the_batch_after_a_step(op, at):
    """The operation's dimension changed from the positions to the batch before step ``at``:
    the samples are coupled from then on. The engine kept the first step's verdict (the layers
    keep the samples apart) and the plan, and its EXACT / EMPIRICAL / MONTE_CARLO squares missed
    the coupling (a cumulative sum over the batch: 52% off the oracle)."""
    for fim_type in TYPES:
        est, ref = adv.run(_Mixer(op).to(DT), _batches(), fim_type,
                           before=lambda i, m: _to_batch(m) if i == at else None)
        assert adv.nonzero(ref)
        assert adv.max_rel(est, ref) < 1e-10, (op, fim_type)


def test_a_dimension_turned_to_the_batch_and_back():
    def before(i, m):
        m.dim = 0 if i == 1 else 1

    for fim_type in TYPES[:3]:
        model = _Mixer("cumsum").to(DT)
        est, ref = adv.run(model, _batches(), fim_type, before=before)
        assert adv.max_rel(est, ref) < 1e-10
        assert not est._persample.last_plan.generic  # the rules again on the last step


def test_a_python_scalar_changed_every_step():
    """A Python scalar (a temperature, a schedule) changed every step: every step right."""
    def before(i, m):
        m.scale = 0.5 + i

    for fim_type in TYPES:
        est, ref = adv.run(_Mixer("scale").to(DT), _batches(), fim_type, before=before)
        assert adv.max_rel(est, ref) < 1e-10


def test_a_roll_along_the_batch_by_a_shift_drawn_0_first():
    """A roll along the batch by a shift drawn per step, 0 on the first step (a no-op: the
    samples apart) and 1 on the next (coupled): whether a size-like argument is 0 is part of the
    shape (its value is not, so that batches of other lengths stay one structure)."""
    def before(i, m):
        m.shift = (0, 1, 2, 0)[i]

    for fim_type in TYPES:
        est, ref = adv.run(_Mixer("shift").to(DT), _batches(), fim_type, before=before)
        assert adv.max_rel(est, ref) < 1e-10, fim_type


class _Keep(torch.autograd.Function):
    """The identity: each sample's gradient its own."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


class _Pool(torch.autograd.Function):
    """Each sample plus the batch's mean: the samples coupled, through a custom Function (one
    C++ node type, PyNode, for every custom Function)."""

    @staticmethod
    def forward(ctx, x):
        return x + x.mean(0, keepdim=True)

    @staticmethod
    def backward(ctx, g):
        return g + g.mean(0, keepdim=True)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.o, self.fn = nn.Linear(D, D), nn.Linear(D, C), _Keep

    def forward(self, x):
        return self.o(self.fn.apply(torch.tanh(self.l(x)))).mean(1)


def test_a_custom_function_swapped_for_one_that_couples_the_batch():
    def before(i, m):
        if i == 1:
            m.fn = _Pool

    for fim_type in TYPES:
        est, ref = adv.run(_Custom().to(DT), _batches(), fim_type, before=before)
        assert adv.max_rel(est, ref) < 1e-10, fim_type


@pytest.mark.parametrize("op", OPS)
def test_the_shape_tells_the_argument(op):
    """The graph's shape differs when only the argument differs, and is the same for the same
    operations on batches of other sizes, with the extension's walk and the Python one."""
    model = _Mixer(op).to(DT)
    params = list(model.parameters())

    def shapes(n: int, t: int):
        x = torch.randn(n, t, D, dtype=DT, generator=_gen(n * t))
        flat = model(x).reshape(-1)
        return graph_walk.walk(flat, params, None).shape, graph_walk.shape(
            fimfast.hooks.walk(flat, params))

    first = shapes(N, T)
    assert shapes(N + 3, T + 2) == first
    model.dim = 0
    other = shapes(N, T)
    assert other[0] != first[0] and other[1] != first[1]


@pytest.mark.parametrize("rep", ["quasi_diag", "kfac"])
def test_structured_refuse_a_coupling_turned_on_after_a_batch(rep):
    model = _Mixer("cumsum").to(DT)
    acc = FisherAccumulator(model, "exact", rep, "sum")
    b1, b2 = _batches(2)
    acc.update(b1)
    before = acc.result().to_dense().clone()
    model.dim = 0
    with pytest.raises(ValueError, match=r"module 'l' .*reaches the output positions"):
        acc.update(b2)
    assert torch.equal(acc.result().to_dense(), before)  # the failed batch left no trace


@pytest.mark.parametrize("rep", ["dense", "block_diag"])
def test_dense_and_block_diag_follow_a_coupling_turned_on_after_a_batch(rep):
    """The representations built from each row's Jacobian take the coupled batch exactly."""
    model = _Mixer("cumsum").to(DT)
    acc = FisherAccumulator(model, "exact", rep, "sum")
    b1, b2 = _batches(2)
    acc.update(b1)
    want = kfac_brute.dense_exact(model, [b1[0]])
    model.dim = 0
    acc.update(b2)
    want = want + kfac_brute.dense_exact(model, [b2[0]])
    if rep == "block_diag":
        k = sum(p.numel() for p in model.l.parameters())
        want[:k, k:] = 0
        want[k:, :k] = 0
    got = acc.result().to_dense()
    assert float((got - want).norm() / want.norm()) < 1e-10


@pytest.mark.parametrize("op", ["cumsum", "shift"])
def test_the_python_walk_probes_the_changed_argument_again(op, monkeypatch):
    """Without the extension's walk (the Python walk's shape: the nodes' ``_saved_``
    constants), the same changes are probed again."""
    monkeypatch.setattr(graph_walk, "_HOST", [None])

    def before(i, m):
        if op == "shift":
            m.shift = (0, 1, 2, 0)[i]
        elif i == 1:
            m.dim = 0

    for fim_type in TYPES[:3]:
        est, ref = adv.run(_Mixer(op).to(DT), _batches(), fim_type, before=before)
        assert adv.max_rel(est, ref) < 1e-10, fim_type
    assert graph_walk._HOST == [None]
