"""The eval-mode BatchNorm's node with a folded batched input gradient
(fimfast/rules/norm_node.py), against torch's own backward in float64: a training backward, the
engine's batched backward (``is_grads_batched`` and the engine's own call,
:func:`fimfast.persample.stream.batched_grads`), a batched backward to the parameters, a double
backward, an in-place op after the layer, where it does not apply, and EXACT against the
generic path."""

from __future__ import annotations

import node_checks
import pytest
import torch
from torch import nn

import fimfast
from fimfast.rules import norm_node

CONFIGS = {
    "1d": (nn.BatchNorm1d, (5,), True),
    "1d_flat": (nn.BatchNorm1d, (), True),
    "2d": (nn.BatchNorm2d, (4, 3), True),
    "2d_no_affine": (nn.BatchNorm2d, (3, 3), False),
    "3d": (nn.BatchNorm3d, (2, 3, 2), True),
}
NAMES = list(CONFIGS)


def _setup(name: str):
    kind, size, affine = CONFIGS[name]
    torch.manual_seed(0)
    m = kind(4, affine=affine).double().eval()
    m.running_mean.normal_()
    m.running_var.uniform_(0.5, 2.0)
    if affine:
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
    x0 = torch.randn(3, 4, *size, dtype=torch.float64, requires_grad=True)
    return m, x0


def _both(m, x0):
    return node_checks.both(norm_node.fold, m, x0)


def _ins(m, x0):
    return [x0] + [p for p in (m.weight, m.bias) if p is not None]


def _folded(monkeypatch) -> list:
    """Record the backwards that took the folded product (a batched gradient)."""
    return node_checks.spy(monkeypatch, norm_node, "_is_batched")


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_training_backward_matches_torch(name):
    m, x0 = _setup(name)
    _, y, z = _both(m, x0)
    G = torch.randn_like(y)
    ins = _ins(m, x0)
    want = torch.autograd.grad(torch.sin(y), ins, G, retain_graph=True)
    got = torch.autograd.grad(torch.sin(z), ins, G)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ["autograd", "stream"])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_batched_backward_folds_the_columns(name, engine, monkeypatch):
    """The engine's backward: several columns to the layer's input, by one product."""
    seen = _folded(monkeypatch)
    node_checks.check_batched_to_input(norm_node.fold, *_setup(name), engine)
    assert seen == [True]


@pytest.mark.parametrize("name", ["2d", "1d"])
def test_batched_backward_to_the_parameters(name, monkeypatch):
    """A batched backward that wants the weight and bias too (as the generic path's): torch's
    loop over the columns, the same values."""
    seen = _folded(monkeypatch)
    node_checks.check_batched_to_parameters(norm_node.fold, *_setup(name))
    assert not any(seen)


def test_double_backward_matches_torch():
    node_checks.check_double_backward(norm_node.fold, *_setup("2d"))


def test_in_place_after_the_layer():
    """``nn.ReLU(inplace=True)`` on the node's output (not a view of an input)."""
    node_checks.check_in_place_after(norm_node.fold, *_setup("2d"))


def test_statistics_changed_after_the_forward():
    """The node keeps the statistics the forward used, not the module's later ones."""
    m, x0 = _setup("2d")
    x, y, z = _both(m, x0)
    cot = torch.randn(3, *y.shape, dtype=torch.float64)
    want = torch.autograd.grad(y, [x], cot, is_grads_batched=True, retain_graph=True)[0]
    with torch.no_grad():
        m.running_var.mul_(3.0)
    got = torch.autograd.grad(z, [x], cot, is_grads_batched=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_left_alone_where_it_does_not_apply():
    """Batch statistics (train mode, no running statistics), an input without gradient, an
    output that is not the layer's own batch norm of that input, autocast: the output as it
    is."""
    m, x0 = _setup("2d")
    x = torch.tanh(x0)
    y = m(x.detach())
    assert norm_node.fold(x.detach(), y, m.bias) is y
    y2 = m(x) * 2
    assert norm_node.fold(x, y2, m.bias) is y2
    y3 = m(x)
    assert norm_node.fold(torch.tanh(x0), y3, m.bias) is y3  # another tensor than the input
    m.train()
    y4 = m(x)
    assert norm_node.fold(x, y4, m.bias) is y4
    m.eval()
    free = nn.BatchNorm2d(4, track_running_stats=False).double().eval()
    y5 = free(x)
    assert norm_node.fold(x, y5, free.bias) is y5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y6 = m.float()(x.float())
        assert norm_node.fold(x.float(), y6, m.bias) is y6


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_estimator_matches_the_generic_path(fim_type, monkeypatch):
    """EXACT and EMPIRICAL on an eval-mode CNN with BatchNorm (float64): the fast path, whose
    backward folds the columns through the node (EXACT), against the generic path."""
    made: list = []
    fold = norm_node.fold
    monkeypatch.setattr(norm_node, "fold", lambda *a: made.append(fold(*a)) or made[-1])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6),
        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()
    for mod in model:
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(mod.weight)
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    fast = fimfast.DiagFisher(model, fim_type)
    ref = fimfast.DiagFisher(model, fim_type)
    ref._persample.use_rules = False
    for _ in range(2):
        ref.step((x, y))
        made.clear()
        fast.step((x, y))
    got, want = fast.result(), ref.result()
    for k in want.keys():
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    # the second step: a node per layer where the first batched several columns (EXACT's 4),
    # none after a step of one column (EMPIRICAL)
    nodes = [t for t in made if type(t.grad_fn).__name__ == "NodeBackward"]
    assert len(nodes) == (2 if fim_type == "exact" else 0)
