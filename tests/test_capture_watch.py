"""The per-sample engine's watch for modules run with gradients disabled (fimfast/hooks.py
``Capture.installed``): a module with a hooked rule records such calls in its capturing forward
(fimfast/rules/forwards.py) or rule hook, the
other modules owning parameters (patched-forward rules, no rule) are wrapped by the no-grad watch
(fimfast/nograd.py), and no global forward pre-hook runs. Values are checked against a float64
per-sample loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as module_mod

import fimfast
from fimfast import UnsupportedModelError
from fimfast.estimator import trainable_parameters


class _Scale(nn.Module):
    """A module owning a parameter and no rule (generic path)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


class _Spy(nn.Module):
    """Records the global pre-hooks and the instance ``forward`` of the targets at each call."""

    def __init__(self, *targets):
        super().__init__()
        self.targets = list(targets)  # not submodules
        self.seen = []

    def forward(self, x):
        self.seen.append((len(module_mod._global_forward_pre_hooks),
                          [t.__dict__.get("forward") for t in self.targets]))
        return x


class _Net(nn.Module):
    """Linear (hooked rule), MultiheadAttention (patched-forward rule), a module without a rule;
    ``where`` names the one run a second time under ``no_grad``."""

    def __init__(self, where=None):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.scale = _Scale(8)
        self.head = nn.Linear(8, 3)
        self.spy = _Spy(self.a, self.mha, self.scale)
        self.where = where

    def forward(self, x):  # x (N, T, 6)
        h = torch.tanh(self.a(x))
        h = self.spy(self.mha(h, h, h, need_weights=False)[0] + h)
        h = self.scale(h)
        if self.where is not None:
            with torch.no_grad():
                if self.where == "a":
                    h = h + 0 * self.a(x)
                elif self.where == "mha":
                    h = h + 0 * self.mha(h, h, h)[0]
                else:
                    h = h + 0 * self.scale(h)
        return self.head(h.mean(1))


def _batch(n=5):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 4, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _empirical_oracle(model, x, y):
    """Sum over the rows of the squared per-row gradient of the row's cross-entropy."""
    names, params = trainable_parameters(model)
    acc = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        for a, g in zip(acc, torch.autograd.grad(loss, params)):
            a += g.double() ** 2
    return dict(zip(names, acc))


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo", "exact"])
def test_capture_installs_no_global_pre_hook_and_puts_everything_back(fim_type):
    torch.manual_seed(0)
    m = _Net().double()
    own = m.head.forward  # a user's instance forward, kept
    m.head.forward = own
    est = fimfast.DiagFisher(m, fim_type, seed=2)
    x, y = _batch()
    for _ in range(2):
        est.step((x, y))
    hooks_during, fwds = m.spy.seen[-1]
    assert hooks_during == len(module_mod._global_forward_pre_hooks) == 0
    # the Linear's capturing forward (fimfast/rules/forwards.py) notes such calls itself
    assert getattr(fwds[0], "__qualname__", "").startswith("Forwards._forward")
    assert fwds[1] is not None and fwds[2] is not None  # patched-rule and rule-less owners
    for mod in (m.a, m.mha, m.scale, m.spy):
        assert "forward" not in mod.__dict__
    assert m.head.__dict__["forward"] is own
    assert not m.a._forward_hooks and not m.mha._forward_hooks
    if fim_type == "empirical":
        est2 = fimfast.DiagFisher(m, fim_type)
        est2.step((x, y))
        want = _empirical_oracle(m, x, y)
        for n, v in est2.result().items():
            torch.testing.assert_close(v, want[n], rtol=1e-10, atol=1e-14, msg=n)


@pytest.mark.parametrize("where", ["a", "mha", "scale"])
@pytest.mark.parametrize("fim_type", ["empirical", "exact"])
def test_a_module_run_without_gradients_is_refused_whatever_watches_it(where, fim_type):
    torch.manual_seed(0)
    m = _Net(where).double()
    est = fimfast.DiagFisher(m, fim_type)
    for _ in range(2):  # the second step runs on the watch's cached wrappers
        with pytest.raises(UnsupportedModelError, match=f"'{where}'.*gradients disabled"):
            est.step(_batch())
    assert est.state.steps == 0
    for mod in (m.a, m.mha, m.scale):
        assert "forward" not in mod.__dict__ and not mod._forward_hooks
    m.where = None  # the same estimator goes on once the model stops doing it
    est.step(_batch())
    assert est.state.steps == 1
