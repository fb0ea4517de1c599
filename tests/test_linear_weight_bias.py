"""fimfast.rules.linear.weight_bias: a Linear layer's weight and bias as its attributes read."""

from __future__ import annotations

import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

from fimfast.rules.linear import weight_bias


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


class _PropertyWeight(torch.nn.Linear):
    pass  # given a class property ``weight`` once made (its __init__ registers the parameter)


class _Lookup(torch.nn.Linear):
    def __getattr__(self, name):  # a lookup of its own: not the registered parameter
        value = super().__getattr__(name)
        return 3 * value if name == "weight" else value


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_weight_bias_equals_the_attributes():
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 2)
    assert weight_bias(plain) == (plain.weight, plain.bias)
    assert weight_bias(plain)[0] is plain.weight
    nobias = torch.nn.Linear(3, 2, bias=False)
    assert weight_bias(nobias) == (nobias.weight, None)
    pruned = torch.nn.Linear(3, 2)
    prune.l1_unstructured(pruned, "weight", 0.5)  # weight = weight_orig * mask, on the instance
    pw, pb = weight_bias(pruned)
    assert pw is pruned.weight and pb is pruned.bias
    param = torch.nn.Linear(3, 2)
    parametrize.register_parametrization(param, "weight", _Double())
    assert torch.equal(weight_bias(param)[0], 2 * param.parametrizations.weight.original)
    prop = _PropertyWeight(3, 2)
    _PropertyWeight.weight = property(lambda self: 3 * self._parameters["weight"])
    assert torch.equal(weight_bias(prop)[0], 3 * prop._parameters["weight"])
    odd = _Lookup(3, 2)
    assert torch.equal(weight_bias(odd)[0], 3 * odd._parameters["weight"])
    for m in (plain, nobias, pruned, param, prop, odd):
        w, b = weight_bias(m)
        assert _same(w, m.weight) and _same(b, m.bias)
