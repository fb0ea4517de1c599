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


def check_batched_to_input(fold: Callable, m: torch.nn.Module, x0: torch.Tensor,
                           engine: str) -> None:
    """Five columns to the layer's input by a batched backward (``autograd``: torch's
    ``is_grads_batched``; ``stream``: the engine's :func:`fimfast.persample.stream.batched_grads`)
    give torch's values."""
    from fimfast.persample import stream

    x, y, z = both(fold, m, x0)
    cot = torch.randn(5, *y.shape, dtype=torch.float64)
    want = torch.autograd.grad(torch.sin(y), [x], cot, is_grads_batched=True,
                               retain_graph=True)[0]
    if engine == "autograd":
        got = torch.autograd.grad(torch.sin(z), [x], cot, is_grads_batched=True)[0]
    else:
        got = stream.batched_grads(torch.sin(z), [x], cot, False)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def check_batched_to_parameters(fold: Callable, m: torch.nn.Module, x0: torch.Tensor) -> None:
    """Four columns by a batched backward to the input and the layer's parameters give torch's
    values."""
    _, y, z = both(fold, m, x0)
    cot = torch.randn(4, *y.shape, dtype=torch.float64)
    ins = [x0] + [p for p in (m.weight, m.bias) if p is not None]
    want = torch.autograd.grad(torch.sin(y), ins, cot, is_grads_batched=True, retain_graph=True)
    got = torch.autograd.grad(torch.sin(z), ins, cot, is_grads_batched=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
