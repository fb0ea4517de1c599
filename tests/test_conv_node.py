"""The transposed convolution's node with a folded batched input gradient
(fimfast/rules/conv_node.py), against torch's own backward in float64: a training backward, the
engine's batched backward to the layer output (``is_grads_batched`` and the engine's own call,
:func:`fimfast.persample.stream.batched_grads`), a batched backward to the parameters, a double
backward, an in-place op after the layer, and the estimator's ``train_step``."""

from __future__ import annotations

import node_checks
import pytest
import torch
from torch import nn

import fimfast
from fimfast.rules import conv_node

# (kind, in, out, kernel, stride, padding, dilation, groups, output padding, input size)
CONFIGS = {
    "1d_k4_s2_p1": (nn.ConvTranspose1d, 3, 4, 4, 2, 1, 1, 1, 0, (6,)),
    "1d_k3_g2_op1": (nn.ConvTranspose1d, 4, 6, 3, 2, 1, 1, 2, 1, (5,)),
    "2d_k3_p1_g2": (nn.ConvTranspose2d, 8, 4, 3, 1, 1, 1, 2, 0, (5, 4)),
    "2d_k32_s23_d12": (nn.ConvTranspose2d, 3, 2, (3, 2), (2, 3), (1, 0), (1, 2), 1, (0, 2),
                       (3, 4)),
    "2d_op_over_stride": (nn.ConvTranspose2d, 3, 2, 3, 1, 2, 3, 1, 2, (5, 4)),
    "2d_g4_wide": (nn.ConvTranspose2d, 16, 24, 3, 2, 1, 1, 4, 1, (3, 3)),
    "3d_k2_s2_g2": (nn.ConvTranspose3d, 2, 4, 2, 2, 0, 1, 2, 0, (2, 3, 2)),
}
NAMES = list(CONFIGS)


def _setup(name: str, bias: bool = True):
    kind, I, O, K, s, p, d, g, op, size = CONFIGS[name]
    torch.manual_seed(0)
    m = kind(I, O, K, stride=s, padding=p, dilation=d, groups=g, output_padding=op,
             bias=bias).double()
    x0 = torch.randn(3, I, *size, dtype=torch.float64, requires_grad=True)
    return m, x0


def _both(m, x0):
    return node_checks.both(conv_node.fold, m, x0)


def _folded(monkeypatch) -> list:
    """Record the levels the node's backward unwraps (one per folded backward)."""
    return node_checks.spy(monkeypatch, conv_node, "_level")


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_training_backward_matches_torch(name):
    m, x0 = _setup(name)
    _, y, z = _both(m, x0)
    G = torch.randn_like(y)
    ins = [x0, m.weight, m.bias]
    want = torch.autograd.grad(torch.sin(y), ins, G, retain_graph=True)
    got = torch.autograd.grad(torch.sin(z), ins, G)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ["autograd", "stream"])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_batched_backward_folds_the_columns(name, engine, monkeypatch):
    """The engine's backward: several columns to a tap below the layer's output and to its
    input; the input gradient is one folded convolution."""
    seen = _folded(monkeypatch)
    node_checks.check_batched_to_input(conv_node.fold, *_setup(name), engine)
    assert seen and all(lv is not None for lv in seen)


@pytest.mark.parametrize("name", ["2d_k3_p1_g2", "1d_k3_g2_op1"])
def test_batched_backward_to_the_parameters(name, monkeypatch):
    """A batched backward that wants the weight and bias too (as the generic path's): the input
    folded, the parameters by torch's loop over the columns."""
    seen = _folded(monkeypatch)
    node_checks.check_batched_to_parameters(conv_node.fold, *_setup(name))
    assert seen and all(lv is not None for lv in seen)


def test_unbatched_engine_backward_and_no_bias():
    """One column to the input only (the engine's EMPIRICAL backward): the convolution of the
    gradient, dense weight for small groups; a layer without bias."""
    m, x0 = _setup("2d_k3_p1_g2", bias=False)
    x, y, z = _both(m, x0)
    G = torch.randn_like(y)
    want = torch.autograd.grad(y, [x], G, retain_graph=True)[0]
    got = torch.autograd.grad(z, [x], G)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_double_backward_matches_torch():
    node_checks.check_double_backward(conv_node.fold, *_setup("2d_k32_s23_d12"))


def test_in_place_after_the_layer():
    """``nn.ReLU(inplace=True)`` on the node's output (not a view of an input)."""
    node_checks.check_in_place_after(conv_node.fold, *_setup("1d_k4_s2_p1"))


def test_left_alone_where_it_does_not_apply():
    """An input without gradient, an output that is not the layer's own transposed convolution
    of that input, autocast: the output as it is."""
    m, x0 = _setup("1d_k4_s2_p1")
    x = torch.tanh(x0)
    y = m(x.detach())
    assert conv_node.fold(x.detach(), y, m.bias) is y
    y2 = m(x) * 2
    assert conv_node.fold(x, y2, m.bias) is y2
    y3 = m(x)
    assert conv_node.fold(torch.tanh(x0), y3, m.bias) is y3  # another tensor than the input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y4 = m.float()(x.float())
        assert conv_node.fold(x.float(), y4, m.bias) is y4


def test_other_level_runs_torch_loop(monkeypatch):
    """A gradient batched at a level the node does not find (a backward on another thread):
    torch's own per-column backward, same values."""
    monkeypatch.setattr(torch._C, "_vmapmode_increment_nesting", lambda: 1)
    monkeypatch.setattr(torch._C, "_vmapmode_decrement_nesting", lambda: 0)
    seen = _folded(monkeypatch)
    m, x0 = _setup("2d_k3_p1_g2")
    x, y, z = _both(m, x0)
    cot = torch.randn(3, *y.shape, dtype=torch.float64)
    want = torch.autograd.grad(torch.sin(y), [x], cot, is_grads_batched=True,
                               retain_graph=True)[0]
    got = torch.autograd.grad(torch.sin(z), [x], cot, is_grads_batched=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert seen == [None]


def test_train_step_gradients_match_a_training_step(monkeypatch):
    """``DiagFisher.train_step`` back-propagates the loss through the node: the same ``.grad``
    as a plain training step (float64)."""
    made: list = []
    fold = conv_node.fold
    monkeypatch.setattr(conv_node, "fold", lambda *a: made.append(fold(*a)) or made[-1])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2), nn.ReLU(),
        nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Flatten(), nn.LazyLinear(3),
    ).double()
    x = torch.randn(4, 2, 11, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    model(x)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    est = fimfast.DiagFisher(model, "exact")
    est.train_step((x, y))
    assert made and all(type(t.grad_fn).__name__ == "NodeBackward" for t in made)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-14)


def test_node_only_where_a_chunk_batches_columns(monkeypatch):
    """The rule makes the node where the estimator's last step batched several columns in a
    chunk of this layer (and in a first step): EXACT's chunks of 3 columns always, EMPIRICAL's
    one column only in its first step, but for a layer of groups of few channels
    (:func:`fimfast.rules.conv_node.single_gain`). Both estimates match the generic path's
    (float64)."""
    made: list = []
    fold = conv_node.fold
    monkeypatch.setattr(conv_node, "fold", lambda *a: made.append(fold(*a)) or made[-1])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2), nn.Tanh(),
        nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1), nn.Tanh(),
        nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2), nn.Tanh(),  # faster for one column
        nn.Flatten(), nn.LazyLinear(4),
    ).double()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    batch = (x, torch.tensor([0, 3, 1]))
    model(x)
    for kind, opts, folds in (("exact", {"class_chunk": 3}, [2, 2]), ("empirical", {}, [2, 1])):
        est = fimfast.DiagFisher(model, kind, seed=3, **opts)
        ref = fimfast.DiagFisher(model, kind, seed=3, **opts)
        ref._persample.use_rules = False
        for want in folds:
            made.clear()
            est.step(batch)
            ref.step(batch)
            assert len(made) == want, kind
            assert not est._persample.last_plan.generic
        for (name, a), (_, b) in zip(est.result().items(), ref.result().items()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=name)
