"""The capture of the Kronecker layers through instance forwards
(fimfast/structured/forwards.py): the gradient tapped at a layer's own output even where a
forward hook of the user's replaces it, nothing left on the modules after a call or a failed one,
forward hooks where instance forwards cannot go (``nn.DataParallel``), keyword calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast
from fimfast.structured import FisherAccumulator
from fimfast.structured import forwards as fwds

N, D, C = 10, 5, 3


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, D, generator=g, dtype=torch.float64),
             torch.randint(0, C, (N,), generator=g))]


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x


def _pair():
    """The same function twice: the output of the first Linear doubled by a forward hook of the
    user's, and by a module of its own after it."""
    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    hooked[0].register_forward_hook(lambda m, i, out: 2 * out)
    plain = nn.Sequential(hooked[0], _Scale(), nn.Tanh(), hooked[2])
    return hooked, plain


def _factors(F):
    return [a.clone() for a in F.A], [g.clone() for g in F.G]


def test_the_gradient_is_tapped_at_the_layers_own_output_under_a_replacing_hook():
    hooked, plain = _pair()
    data = _data()
    A1, G1 = _factors(fimfast.fisher(hooked, data, "exact", "kfac"))
    # the same modules in `plain`: the hook runs there too, so remove it for the reference
    hooked[0]._forward_hooks.clear()
    A2, G2 = _factors(fimfast.fisher(plain, data, "exact", "kfac"))
    for a, b in zip(A1 + G1, A2 + G2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # G of the first layer: the gradient at its own output is twice the one after the doubling
    assert not torch.allclose(G1[0], G1[0] / 4)


def _no_instance_forward(model):
    return all("forward" not in vars(m) for m in model.modules())


def test_nothing_is_left_on_the_modules_after_a_call_or_a_failed_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    data = _data()
    acc = FisherAccumulator(model, "monte_carlo", "kfac", seed=0)
    acc.update(data[0])
    assert _no_instance_forward(model)
    before = [(s.A.clone(), s.G.clone(), s.npos) for s in acc.sums]
    bad = (data[0][0][:, :4], data[0][1])  # the first Linear refuses 4 features
    with pytest.raises(RuntimeError):
        acc.update(bad)
    assert _no_instance_forward(model)
    assert all(not layer.calls for layer in acc.layers)
    for s, (a, g, n) in zip(acc.sums, before):
        assert torch.equal(s.A, a) and torch.equal(s.G, g) and s.npos == n
    acc.update(data[0])  # and the accumulator goes on
    assert acc.stream.batches == 2


def test_a_forward_set_during_the_batch_is_kept_and_the_call_refused():
    torch.manual_seed(0)
    lin = nn.Linear(6, C).double()
    mine = lin.forward  # a bound method of the class's forward

    class Setter(nn.Module):
        def forward(self, x):
            vars(lin)["forward"] = mine  # replaces the capturing forward for later calls
            return x

    model = nn.Sequential(nn.Linear(D, 6), Setter(), lin).double()
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) holds trainable parameters but "
                       "its forward was never called"):
        fimfast.fisher(model, _data(), "exact", "kfac")
    assert vars(lin).get("forward") is mine


def test_dataparallel_keeps_the_forward_hooks_and_gives_the_same_factors(monkeypatch):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    made = []
    hook_of = fwds.hook_of
    monkeypatch.setattr(fwds, "hook_of", lambda layer: made.append(layer.name) or hook_of(layer))
    data = _data()
    F = fimfast.fisher(nn.DataParallel(inner), data, "exact", "kfac")
    assert made == ["module.0", "module.2"]
    made.clear()
    ref = fimfast.fisher(inner, data, "exact", "kfac")
    assert made == []  # instance forwards
    for a, b in zip(F.A + F.G, ref.A + ref.G):
        assert torch.equal(a, b)


class _Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x):
        return self.lin(input=x)


def test_a_layer_called_with_a_keyword_input():
    torch.manual_seed(0)
    model = _Keyword().double()
    data = _data()
    F = fimfast.fisher(model, data, "exact", "kfac")
    X = data[0][0]
    A = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1)
    torch.testing.assert_close(F.A[0], A.T @ A / N)


class _DirectForward(nn.Module):
    """Calls its second layer's ``forward`` directly (no ``__call__``, so no hooks run)."""

    def __init__(self, direct: bool):
        super().__init__()
        self.a, self.b, self.direct = nn.Linear(D, 6), nn.Linear(6, C), direct

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b.forward(h) if self.direct else self.b(h)


def test_a_layer_whose_forward_is_called_directly_is_captured():
    torch.manual_seed(0)
    direct = _DirectForward(True).double()
    called = _DirectForward(False).double()
    called.load_state_dict(direct.state_dict())
    data = _data()
    F = fimfast.fisher(direct, data, "exact", "kfac")
    ref = fimfast.fisher(called, data, "exact", "kfac")
    for a, b in zip(F.A + F.G, ref.A + ref.G):
        assert torch.equal(a, b)
