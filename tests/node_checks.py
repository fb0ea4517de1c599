"""Checks shared by the tests of the rules' autograd nodes (tests/test_conv_node.py,
tests/test_norm_node.py): a node built by ``fold(x, y, bias)`` in place of a layer's output must
give torch's values in every backward."""

from __future__ import annotations

from collections.abc import Callable

import torch


def both(fold: Callable, m: torch.nn.Module, x0: torch.Tensor):
    """``(x, y_native, y_node)``: the layer's output as torch computes it, and as the node."""
    x = torch.tanh(x0)
    y = m(x)
    z = fold(x, m(x), m.bias)
    assert type(z.grad_fn).__name__ == "NodeBackward"
    assert torch.equal(y, z)
    return x, y, z


def spy(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` (a one-argument function) by one recording what it returns."""
    seen: list = []
    fn = getattr(module, name)

    def wrapper(g):
        seen.append(fn(g))
        return seen[-1]

    monkeypatch.setattr(module, name, wrapper)
    return seen


def check_double_backward(fold: Callable, m: torch.nn.Module, x0: torch.Tensor) -> None:
    """A second backward through the first one's graph gives torch's values."""
    _, y, z = both(fold, m, x0)
    outs = []
    for out in (y, z):
        (gx,) = torch.autograd.grad(torch.sin(out).sum(), [x0], create_graph=True)
        outs.append(torch.autograd.grad(gx.square().sum(), [x0, m.weight], retain_graph=True))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def check_in_place_after(fold: Callable, m: torch.nn.Module, x0: torch.Tensor) -> None:
    """``nn.ReLU(inplace=True)`` on the node's output (not a view of an input)."""
    _, y, z = both(fold, m, x0)
    G = torch.randn_like(y)
    want = torch.autograd.grad(torch.relu(y), [x0, m.weight], G, retain_graph=True)
    got = torch.autograd.grad(torch.relu_(z), [x0, m.weight], G)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
