"""The usual call of a plain linear layer recorded inline by its capturing forward
(fimfast/rules/linear_forward.py): the same calls and taps as the rule records them, the same
estimates bit for bit as the hooked capture (which never takes the inline record) and as the
float64 oracle; any other call (add-tapped, keyword input, folded batch, a rule subclass that
records otherwise, a changed weight) is left to the rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from cases import classifier_case
from oracle import oracle, rel_error

import fimfast
from fimfast.rules import forwards, linear_forward
from fimfast.rules.linear import HFConv1DRule, LinearRule


def _Case(model, x, y):
    return classifier_case(model, (x, y), 4)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(),
                         nn.Linear(5, 4)).double()


def _batch(N=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (N,),
                                                                               generator=g)


@pytest.fixture
def counted(monkeypatch):
    """Counts of the inline records that took a call (True) and that left it (False)."""
    seen = {True: 0, False: 0}

    def recorder(module, rule):
        fn = linear_forward.recorder(module, rule)
        if fn is None:
            return None

        def record(*a):
            r = fn(*a)
            seen[r] += 1
            return r

        return record

    monkeypatch.setattr(forwards, "recorder", recorder)
    return seen


def _steps(model, batch, fim_type, hooked, steps=4):
    est = fimfast.DiagFisher(model, fim_type, seed=5)
    est._persample.hooked = hooked
    for _ in range(steps):
        est.step(batch)
    return {k: v.clone() for k, v in est.result().items()}, est


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo", "exact"])
def test_the_inline_record_gives_the_hooked_estimates_and_the_oracle(counted, fim_type):
    m = _mlp()
    x, y = _batch()
    got, est = _steps(m, (x, y), fim_type, hooked=False)
    # every layer of the last two steps (their taps direct once an earlier step showed the
    # outputs left alone)
    assert counted[True] >= 6
    ref, _ = _steps(m, (x, y), fim_type, hooked=True)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    if fim_type != "monte_carlo":
        want = oracle(_Case(m, x, y), fim_type)
        assert all(v.abs().sum() > 0 for v in want.values())  # no detached parameter
        want = {k: 4 * v for k, v in want.items()}
        assert rel_error(got, want) < 1e-10


def test_the_inline_record_makes_the_calls_the_rule_makes():
    m = _mlp()
    x, y = _batch()
    est = fimfast.DiagFisher(m, "empirical", seed=0)
    for _ in range(3):  # the outputs are tapped directly from the third step on
        est.step((x, y))
    eng = est._persample
    params = list(m.parameters())
    got, ref = [], []
    for hooked, out in ((False, got), (True, ref)):
        eng.hooked = hooked
        mods = eng._modules(m, params)
        eng._forwards = forwards.Forwards(m, mods[0])
        with eng.capture(m, params, len(x), False, mods) as cap:
            m(x)
        out.extend(cap.calls)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert (a.module, a.rule, a.ok, a.reason, a.chunks) == (b.module, b.rule, b.ok, b.reason,
                                                                b.chunks)
        assert a.uses is b.uses and a.internal is b.internal and a.uses_key == b.uses_key
        assert a.data.keys() == b.data.keys() and torch.equal(a.data["x"], b.data["x"])
        assert a.data["x"].requires_grad == b.data["x"].requires_grad
        (ta,), (tb,) = a.taps, b.taps
        for f in ("shape", "version", "key", "direct", "lead", "batch_first", "bdim", "cands"):
            assert getattr(ta, f) == getattr(tb, f), f
        assert ta.direct and ta.handle is ta.out() and ta.keep is None


def test_calls_it_does_not_know_go_to_the_rule(counted):
    class KwNet(nn.Module):  # a keyword input
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 4)

        def forward(self, x):
            return self.b(input=torch.tanh(self.a(x)))

    class Folded(nn.Module):  # (N * 2, d): the batch folded into the first dim
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(10, 4)

        def forward(self, x):
            h = torch.tanh(self.a(x.reshape(-1, 3)))
            return self.b(h.reshape(x.shape[0], -1))

    x, y = _batch()
    for make in (KwNet, Folded):
        torch.manual_seed(0)
        m = make().double()
        counted[True] = counted[False] = 0
        got, _ = _steps(m, (x, y), "empirical", hooked=False)
        ref, _ = _steps(m, (x, y), "empirical", hooked=True)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (make.__name__, k)
        want = {k: 4 * v for k, v in oracle(_Case(m, x, y), "empirical").items()}
        assert rel_error(got, want) < 1e-10
        assert counted[False] >= 2  # one layer's calls at least were left to the rule


def test_a_replaced_weight_is_read_again(counted):
    m = _mlp()
    x, y = _batch()
    est = fimfast.DiagFisher(m, "empirical", seed=0)
    est.step((x, y))
    est.step((x, y))
    m[0].weight = nn.Parameter(m[0].weight.detach() * 2)  # a new parameter object
    est.reset()
    est.step((x, y))
    want = oracle(_Case(m, x, y), "empirical")
    assert rel_error(est.result(), want) < 1e-10


def test_only_rules_that_record_as_linear_itself_take_it():
    class Own(LinearRule):
        def capture(self, cap, module, x, y):
            return super().capture(cap, module, x, y)

    class Inputs(LinearRule):
        def inputs(self, args, kwargs):
            return super().inputs(args, kwargs)

    lin = nn.Linear(2, 3)
    assert linear_forward.recorder(lin, LinearRule()) is not None
    assert linear_forward.recorder(lin, HFConv1DRule()) is not None  # class attributes only
    assert linear_forward.recorder(lin, Own()) is None
    assert linear_forward.recorder(lin, Inputs()) is None
    assert linear_forward.recorder(lin, object()) is None
