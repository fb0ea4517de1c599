"""The extension's walk of a per-sample step's graph (csrc/tap_walk.cpp, fimfast/persample/walk.py)
decides what the Python walk (fimfast.hooks.walk) decides: the edges into every parameter, which
tap handles the logits' gradient reaches, reentrant checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fimfast import _ext, hooks
from fimfast.persample import walk as walkmod

_needs_ext = pytest.mark.skipif(
    _ext.host_function("tap_walk") is None, reason="the extension is not built"
)


class _Cap:
    """What :func:`walkmod.walk` reads of a capture: ``calls[i].taps[j].handle``."""

    def __init__(self, handles):
        tap = type("T", (), {})
        call = type("C", (), {})
        self.calls = []
        for h in handles:
            t, c = tap(), call()
            t.handle, c.taps = h, [t]
            self.calls.append(c)


def _same(z, params, handles):
    ref = hooks.walk(z, params)
    got = walkmod.walk(z, params, _Cap(handles))
    assert isinstance(got, walkmod.TapGraph)
    assert dict(got.edges) == dict(ref.edges)
    assert got.reentrant == ref.reentrant
    assert [got.reaches(h) for h in handles] == [ref.reaches(h) for h in handles]
    return got


@_needs_ext
def test_edges_taps_and_leaves():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 5), nn.Linear(5, 3)
    x = torch.randn(6, 4)
    h = a(x)
    zero = torch.zeros((), requires_grad=True)
    add = zero.expand(h.shape)
    hidden = h + add
    gone = torch.zeros((), requires_grad=True).expand(h.shape)  # an add tap never used
    z = b(torch.tanh(hidden)) + a.weight.sum()  # the first weight twice
    frozen = nn.Parameter(torch.randn(3))
    got = _same(z, [a.weight, a.bias, b.weight, b.bias, frozen, a.weight],
                [h, add, zero, gone, z, x])
    assert got.edges[id(a.weight)] == 2 and id(frozen) not in got.edges
    assert [got.reaches(t) for t in (h, add, zero, gone, x)] == [True, True, True, False, False]


@_needs_ext
def test_detached_and_leaf_logits():
    w = nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3)
    _same((x @ w).detach(), [w], [x])
    leaf = torch.randn(2, 3, requires_grad=True)
    got = _same(leaf, [w], [leaf])
    assert not got.edges


@_needs_ext
def test_reentrant_checkpoint():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    x = torch.randn(3, 4, requires_grad=True)
    z = b(checkpoint(a, x, use_reentrant=True))
    assert _same(z, [a.weight, b.weight], []).reentrant
    z = b(checkpoint(a, x, use_reentrant=False))
    assert not _same(z, [a.weight, b.weight], []).reentrant


def test_without_the_extension(monkeypatch):
    monkeypatch.setattr(walkmod, "_HOST", [None])
    w = nn.Parameter(torch.randn(3, 3))
    z = torch.randn(2, 3) @ w
    g = walkmod.walk(z, [w], None)
    assert type(g) is hooks.Graph and g.edges[id(w)] == 1


@pytest.mark.parametrize("ext", [True, False])
def test_shape(ext, monkeypatch):
    """The graph's shape is the same for the same operations, whether a layer is tapped by an
    add or directly, and changes with an operation added (a mean over the batch)."""
    if ext and _ext.host_function("tap_walk") is None:
        pytest.skip("the extension is not built")
    if not ext:
        monkeypatch.setattr(walkmod, "_HOST", [None])
    torch.manual_seed(0)
    a, b = nn.Linear(4, 5), nn.Linear(5, 3)
    params = [a.weight, a.bias, b.weight, b.bias]

    def shape(x, mean=False, add_tap=False):
        h = a(x)
        if add_tap:
            h = h + torch.zeros((), requires_grad=True).expand(h.shape)
        if mean:
            h = h * h.mean(0, keepdim=True)
        return walkmod.shape(walkmod.walk(b(torch.tanh(h)), params, None))

    x = torch.randn(6, 4)
    s = shape(x)
    assert shape(torch.randn(3, 4)) == s and shape(x, add_tap=True) == s
    assert shape(x, mean=True) != s and shape(x, mean=True) == shape(x, mean=True, add_tap=True)
