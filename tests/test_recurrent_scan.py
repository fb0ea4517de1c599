"""The steps of a recurrent layer as one autograd node (fimfast/rules/recurrent_scan.py).

Its forward is torch's fused kernel and its backward back-propagation through time written out
for each cell: the outputs and every input gradient (gate inputs, initial state, W_hh, b_hh) must
equal those of the unrolled primitive steps (fimfast.rules.recurrent._unrolled_steps, plain
autograd) to float64 rounding, for one cotangent and for a batch of them (the engine's batched
backward), in both directions, from given initial states. End to end against the float64 oracle:
tests/test_recurrent.py.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimfast import hooks, layers
from fimfast.rules import recurrent, recurrent_scan

MODES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
T, N, I, H = 6, 3, 2, 4


def _inputs(mode: str, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = MODES[mode] * H
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, wih = r(T, N, I), r(G, I)
    bih = r(G) if bias else None
    gi = F.linear(x, wih, bih).requires_grad_()
    h0 = r(N, H).requires_grad_()
    c0 = r(N, H).requires_grad_() if mode == "LSTM" else None
    whh = (0.7 * r(G, H)).requires_grad_()
    bhh = r(G).requires_grad_() if bias else None
    return x, {"weight_ih": wih, "bias_ih": bih}, gi, h0, c0, whh, bhh


def _unrolled(mode, gi, h0, c0, whh, bhh, reverse):
    outs: list = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    h, c, _ = recurrent._unrolled_steps(mode, H, steps, gi.unbind(0), h0, c0, whh, bhh, None,
                                        None, outs)
    return torch.stack(outs), h, c


def _max_diff(a, b) -> float:
    return max(float((u - v).detach().abs().max()) for u, v in zip(a, b, strict=True))


@pytest.fixture(params=["torch", "cpp"])
def bptt_backend(request, monkeypatch):
    """The backend of fimfast.ops.recurrent_bptt: the torch loop or the cpp kernel."""
    if request.param == "cpp":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ops"))
        from op_backends import require  # skips, or fails where the extension must load

        require("cpp")
    monkeypatch.setenv("FIMFAST_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_the_unrolled_steps(mode, reverse, bias, bptt_backend):
    x, W, gi, h0, c0, whh, bhh = _inputs(mode, bias)
    got = recurrent_scan.run(mode, x, gi, h0, c0, W, whh, bhh, reverse)
    ref = _unrolled(mode, gi, h0, c0, whh, bhh, reverse)
    outs = [o for o in got if o is not None]
    refs = [o for o in ref if o is not None]
    assert _max_diff(outs, refs) <= 1e-13
    wrt = [t for t in (gi, h0, c0, whh, bhh) if t is not None]
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    a = torch.autograd.grad(outs, wrt, cots, retain_graph=True)
    b = torch.autograd.grad(refs, wrt, cots, retain_graph=True)
    scale = max(float(t.abs().max()) for t in b)
    assert _max_diff(a, b) <= 1e-13 * scale
    # a batch of 5 cotangents (the engine's batched backward), the last output alone included
    batch = [torch.randn((5, *o.shape), generator=g, dtype=o.dtype) for o in outs]
    batch[0][2] = 0
    a = torch.autograd.grad(outs, wrt, batch, retain_graph=True, is_grads_batched=True)
    b = torch.autograd.grad(refs, wrt, batch, retain_graph=True, is_grads_batched=True)
    assert _max_diff(a, b) <= 1e-13 * scale


@pytest.mark.parametrize("mode", list(MODES))
def test_batched_backward_runs_without_vmap_fallback(mode, bptt_backend):
    """Under the batched backward, the recurrence uses ops vmap batches (no per-column loop):
    the reference's, or the cpp kernel's Batched rule."""
    x, W, gi, h0, c0, whh, bhh = _inputs(mode, True)
    outs = [o for o in recurrent_scan.run(mode, x, gi, h0, c0, W, whh, bhh, False)
            if o is not None]
    cots = [torch.ones((3, *o.shape), dtype=o.dtype) for o in outs]
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.autograd.grad(outs, [gi, whh], cots, is_grads_batched=True)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)


def _nodes(out: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        names.append(type(n).__name__)
        stack.extend(f for f, _ in n.next_functions)
    return names


@pytest.mark.parametrize("case", ["plain", "proj_size", "autocast"])
def test_layers_run_as_one_node_per_direction(case):
    """Two layers, both directions: four Scan nodes and no cell; with proj_size or under
    autocast the unrolled cells."""
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2 if case == "proj_size" else 0)
    cap = hooks.Capture(rnn, list(rnn.parameters()), layers.rule_for)
    with cap.installed(), torch.autocast("cpu", enabled=case == "autocast"):
        out, _ = rnn(torch.randn(5, 2, 3))
    names = _nodes(out)
    assert names.count("ScanBackward") == (4 if case == "plain" else 0)
    assert (sum("Sigmoid" in n for n in names) > 0) == (case != "plain")


def test_weight_gradient_only_when_the_backward_wants_it(monkeypatch):
    """A backward to the gate inputs alone (the engine's) skips the W_hh and b_hh products; a
    backward that reaches W_hh gets them (and equals the unrolled steps, above)."""
    seen = []
    wanted = recurrent_scan.input_wanted
    monkeypatch.setattr(recurrent_scan, "input_wanted",
                        lambda ctx, i, first: seen.append(wanted(ctx, i, first)) or seen[-1])
    x, W, gi, h0, c0, whh, bhh = _inputs("GRU", True)
    ys, _, _ = recurrent_scan.run("GRU", x, gi, h0, c0, W, whh, bhh, False)
    torch.autograd.grad(ys.sum(), [gi], retain_graph=True)
    assert seen == [False, False]
    seen.clear()
    g = torch.autograd.grad(ys.sum(), [gi, whh], retain_graph=True)
    assert seen == [True, False] and g[1] is not None
    seen.clear()
    ys.sum().backward()
    assert seen == [True, True] and whh.grad is not None and bhh.grad is not None


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_train_step_gradients_equal_torch(cell):
    """``train_step`` back-propagates the loss through the captured graph, the recurrent node
    included: every ``.grad`` (W_hh, b_hh through the written-out backward) equals torch's own
    backward of the same loss, and the Fisher equals that of a plain ``step``."""
    from fimfast import DiagFisher

    torch.manual_seed(0)
    rnn = cell(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    head = nn.Linear(8, 3).double()
    model = nn.Sequential(rnn, _Last(), head)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    est = DiagFisher(model, "empirical")
    est.train_step((x, y))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert float((got[n] - p.grad).abs().max()) <= 1e-12 * (1 + float(p.grad.abs().max())), n
    ref = DiagFisher(model, "empirical")
    ref.step((x, y))
    for (n, a), (_, b) in zip(est.result().items(), ref.result().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=0), n


class _Last(nn.Module):
    def forward(self, out):
        return out[0][:, -1]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("class_chunk", [1, 2])
def test_streamed_and_chunked_columns_match_the_oracle(cell, class_chunk):
    """EXACT one column per backward (the squares formed as the backward runs, add taps) and in
    chunks of two, on a bidirectional two-layer tagger: the float64 oracle."""
    from oracle import oracle, rel_error
    from test_recurrent import _case, _model, _run
    from tolerances import DET_REL_F64

    v = dict(cell=cell, num_layers=2, bidirectional=True, batch_first=True)
    case = _case(_model("tag", v).double(), "tag").to(torch.float64)
    got, est = _run(case, "exact", class_chunk=class_chunk)
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    assert not est._persample.last_plan.generic
    assert est._persample.add_taps == (class_chunk == 1)  # streamed: one column per backward


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_repeated_backward_to_the_taps_reuses_the_gates(mode, bptt_backend):
    """The engine's backward to the gate inputs alone (run once per column when columns are
    streamed) keeps the gates on the node for the next column; each column's gradients equal the
    unrolled steps'. A backward that reaches W_hh (a training step) keeps nothing."""
    x, W, gi, h0, c0, whh, bhh = _inputs(mode, True)
    got = [o for o in recurrent_scan.run(mode, x, gi, h0, c0, W, whh, bhh, True) if o is not None]
    ref = [o for o in _unrolled(mode, gi, h0, c0, whh, bhh, True) if o is not None]
    node = got[0].grad_fn
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in got]
        a = torch.autograd.grad(got, [gi, h0], cots, retain_graph=True)
        b = torch.autograd.grad(ref, [gi, h0], cots, retain_graph=True)
        assert _max_diff(a, b) <= 1e-13 * max(float(t.abs().max()) for t in b)
        assert hasattr(node, "gates")
    fresh = [o for o in recurrent_scan.run(mode, x, gi, h0, c0, W, whh, bhh, True)
             if o is not None]
    torch.autograd.grad(fresh[0].sum(), [gi, whh])
    assert not hasattr(fresh[0].grad_fn, "gates")


def _failed_step_changes_nothing(model, fim_type, monkeypatch, owner, name, failing, match):
    """A step with ``owner.name`` replaced by ``failing`` raises ``match`` and leaves the estimate
    of the step before it as it was; with the original back, the next step adds to it as if
    nothing happened (the same as two steps of a fresh estimator)."""
    from fimfast import DiagFisher

    x, y = torch.randn(5, 6, 3), torch.randint(0, 3, (5,))
    est = DiagFisher(model, fim_type)
    est.step((x, y))
    before = {n: t.clone() for n, t in est.result().items()}
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, failing(real))
    with pytest.raises(RuntimeError, match=match):
        est.step((x, y))
    monkeypatch.setattr(owner, name, real)
    for n, t in est.result().items():
        assert torch.equal(t, before[n]), n
    est.step((x, y))
    ref = DiagFisher(model, fim_type)
    ref.step((x, y))
    ref.step((x, y))
    for (n, a), (_, b) in zip(est.result().items(), ref.result().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=0), n


def test_a_failing_recurrence_leaves_the_estimate_unchanged(monkeypatch):
    """An error inside the recurrent backward (every call of the op after the first, mid-step:
    the batched backward's per-column fallback fails too) aborts the step with that error and
    leaves the accumulated estimate as it was; the next step adds to it as if nothing happened."""
    from fimfast import ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2, batch_first=True), _Last(), nn.Linear(4, 3))

    def failing(real):
        calls = []

        def op(*args, **kwargs):
            calls.append(1)
            if len(calls) >= 2:
                raise RuntimeError("recurrence failed")
            return real(*args, **kwargs)
        return op

    _failed_step_changes_nothing(model, "exact", monkeypatch, ops, "recurrent_bptt", failing,
                                 "recurrence failed")


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_keeps_the_pre_activations(mode, bptt_backend, monkeypatch):
    """With the cpp backend an LSTM's or a GRU's node runs fimfast.ops.recurrent_forward, which
    keeps the gate pre-activations: no fused kernel in the forward, no product for the gates in
    the backward (W_hh h_{t-1} of all steps); an Elman layer, or the torch backend, keeps torch's
    fused kernel. Either way the outputs and gradients are those of the unrolled steps (above)."""
    own = bptt_backend == "cpp" and mode in ("LSTM", "GRU")
    fused, products = [], []
    real_fused, real_addmm = recurrent_scan._fused, torch.addmm
    monkeypatch.setattr(recurrent_scan, "_fused", lambda *a: fused.append(1) or real_fused(*a))
    x, W, gi, h0, c0, whh, bhh = _inputs(mode, True)
    outs = [o for o in recurrent_scan.run(mode, x, gi, h0, c0, W, whh, bhh, False)
            if o is not None]
    assert bool(fused) != own
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: products.append(1) or real_addmm(*a, **k))
    torch.autograd.grad(outs[0].sum(), [gi])
    assert bool(products) == (not own and mode in ("LSTM", "GRU"))


def test_a_failing_forward_kernel_leaves_the_estimate_unchanged(monkeypatch):
    """An error in the node's forward kernel (fimfast.ops.recurrent_forward) aborts the step
    with that error before anything is added; the estimate stays as it was and the next step
    adds to it as if nothing happened."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4, batch_first=True), _Last(), nn.Linear(4, 3))

    def failing(real):
        def own_forward(mode, gi):
            def kernel(*args):
                raise RuntimeError("forward kernel failed")
            return kernel
        return own_forward

    _failed_step_changes_nothing(model, "empirical", monkeypatch, recurrent_scan, "_own_forward",
                                 failing, "forward kernel failed")
