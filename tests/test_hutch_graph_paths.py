"""The per-step graph paths of the HUTCHINSON family and the per-sample plan: the engine call
behind ``torch.autograd.grad`` (:func:`fimfast.hutchinson.vjp`) and the walks of the graph of the
logits (:func:`fimfast.hooks.walk`, :func:`fimfast.hutchinson.has_reentrant_checkpoint`), each
checked against the plain reference it replaces."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import fimfast
from fimfast import hooks, hutchinson


def _reference_walk(flat, params):
    """The walk as written before: every node pushed, leaves told by ``getattr``."""
    wanted = {id(p) for p in params}
    counts, seen, reentrant = Counter(), set(), False
    stack = [flat.grad_fn] if flat.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        reentrant = reentrant or type(node).__name__ == "CheckpointFunctionBackward"
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                if id(var) in wanted:
                    counts[id(var)] += 1
                seen.add(nxt)
                continue
            stack.append(nxt)
    return counts, seen, reentrant


class _Net(torch.nn.Module):
    """A weight used three times (twice in one call), an unused parameter, a frozen one, an
    input leaf that requires grad, and optionally a reentrant checkpoint segment."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 3)
        self.unused = torch.nn.Parameter(torch.ones(2))
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.tanh(self.a(x) * self.frozen)
        if self.reentrant:
            h = checkpoint(lambda t: self.a(t).relu(), h, use_reentrant=True)
        h = h + self.a.weight.sum() * (self.a.weight ** 2).mean()
        return self.b(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_walk_counts_every_parameter_edge_as_the_reference(reentrant):
    torch.manual_seed(0)
    net = _Net(reentrant)
    x = torch.randn(5, 4, requires_grad=True)
    z = net(x)
    params = [p for p in net.parameters() if p.requires_grad]
    g = hooks.walk(z, params)
    counts, seen, re = _reference_walk(z, params)
    assert g.edges == counts and g.nodes == seen and g.reentrant is re is reentrant
    # a.weight: the first call, the sum and the square (the checkpointed call runs without grad)
    assert g.edges[id(net.a.weight)] == 3 and g.edges[id(net.unused)] == 0
    assert g.reaches(x) and not g.reaches(torch.zeros(1, requires_grad=True))
    assert hutchinson.has_reentrant_checkpoint(z) is reentrant
    assert hooks.walk(z.detach(), params).edges == Counter()


def test_a_reentrant_segment_behind_a_shared_leaf_is_found():
    """The segment's node is reached only through a node also reached another way first."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    h = lin(x)
    inner = checkpoint(lambda t: t.exp(), h, use_reentrant=True)
    z = h * 2 + inner
    assert hutchinson.has_reentrant_checkpoint(z)
    assert hooks.walk(z, list(lin.parameters())).reentrant


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
    ).to(dtype)


def test_vjp_engine_path_equals_autograd_grad():
    m = _mlp()
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # unused: None
    params = [*m.parameters(), extra]
    x = torch.randn(7, 6, dtype=torch.float64)
    z = m(x)
    cot = torch.randn_like(z)
    assert hutchinson._plain(z, params, cot)
    ref = torch.autograd.grad(z, params, cot, retain_graph=True, allow_unused=True)
    got = hutchinson.vjp(z, params, cot, retain_graph=True, reentrant=False)
    assert got[-1] is None and ref[-1] is None
    for a, b in zip(got[:-1], ref[:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # without retain_graph the graph is freed, as torch.autograd.grad frees it
    hutchinson.vjp(z, params, cot, retain_graph=False, reentrant=False)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(z, params[:1], cot)


class _Recording(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.grads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.autograd.grad:
            self.grads += 1
        return func(*args, **(kwargs or {}))


def test_vjp_goes_through_autograd_grad_when_it_has_something_to_check():
    m = _mlp()
    params = list(m.parameters())
    x = torch.randn(7, 6, dtype=torch.float64)
    z = m(x)
    cot = torch.randn_like(z)
    ref = torch.autograd.grad(z, params, cot, retain_graph=True)
    # another dtype or shape: torch.autograd.grad's own checks and errors
    assert not hutchinson._plain(z, params, cot.float())
    assert not hutchinson._plain(z, params, cot[:3])
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        hutchinson.vjp(z, params, cot[:3], retain_graph=True, reentrant=False)
    # an active torch-function mode sees the call, as it would see torch.autograd.grad
    with _Recording() as mode:
        assert not hutchinson._plain(z, params, cot)
        got = hutchinson.vjp(z, params, cot, retain_graph=True, reentrant=False)
    assert mode.grads == 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hutchinson_step_on_the_engine_path_is_the_float64_estimate():
    """One step of the object API against probes formed and back-propagated by hand."""
    m = _mlp()
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    est = fimfast.DiagFisher(m, "hutchinson", seed=3)
    offset = est.offset
    est.step((x, y))
    z = m(x)
    from fimfast import ops

    u = ops.probe_logit_grad(z.detach(), "hutchinson", 3, offset, 1)[0]
    g = torch.autograd.grad(z, list(m.parameters()), u)
    got = est.result()
    for (name, _), gi in zip(m.named_parameters(), g):
        torch.testing.assert_close(got[name], gi * gi, rtol=1e-12, atol=0)
