"""The captured cell step of the CPU (fimfast/rules/cell_steps.py): its output equal bit for bit
to torch's cell, its gradients (one column and several batched) equal to those of torch's cell
to rounding, in float32 and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fimfast.persample import stream
from fimfast.rules.cell_steps import cell_step

_FUNCS = {"GRU": (torch.gru_cell, 3), "LSTM": (torch.lstm_cell, 4),
          "RNN_TANH": (torch.rnn_tanh_cell, 1), "RNN_RELU": (torch.rnn_relu_cell, 1)}


def _loop(mode: str, dtype, ours: bool, plain: bool = False, T: int = 5, N: int = 6, I: int = 4,
          H: int = 7, columns: int = 2):
    """``T`` steps of a cell from seeded data: the last ``h`` (and ``c``), the input projections
    ``gi`` (``plain``: torch's cell on the inputs, the projections unused)."""
    g = torch.Generator().manual_seed(3)
    func, k = _FUNCS[mode]
    w_ih = torch.randn(k * H, I, generator=g, dtype=dtype, requires_grad=True)
    w_hh = torch.randn(k * H, H, generator=g, dtype=dtype, requires_grad=True)
    b_ih, b_hh = (torch.randn(k * H, generator=g, dtype=dtype, requires_grad=True)
                  for _ in range(2))
    x = torch.randn(T, N, I, generator=g, dtype=dtype)
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    c = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    h0, c0, taps = h, c, []
    for t in range(T):
        gi = F.linear(x[t], w_ih, b_ih)
        taps.append(gi)
        if ours:
            out = cell_step(mode, func, gi, h, c if mode == "LSTM" else None, w_hh, b_hh, columns)
        elif plain:
            out = func(x[t], (h, c) if mode == "LSTM" else h, w_ih, w_hh, b_ih, b_hh)
        else:  # torch's cell after the tapped input projection (its input side gi itself)
            e, we = gi.new_empty(N, 0), gi.new_empty(k * H, 0)
            out = func(e, (h, c) if mode == "LSTM" else h, we, w_hh, gi, b_hh)
        h, c = out if mode == "LSTM" else (out, None)
    outs = (h, c) if mode == "LSTM" else (h,)
    return outs, taps, (w_hh, b_hh, h0, c0)


@pytest.mark.parametrize("columns", [1, 2])
@pytest.mark.parametrize("H", [7, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", sorted(_FUNCS))
def test_cell_step_forward_is_torchs_bit_for_bit(mode, dtype, H, columns):
    """Against torch's cell called on the inputs, and after the tapped input projection; with
    and without autograd (hidden sizes off and on the vector width)."""
    with torch.no_grad():
        want, _, _ = _loop(mode, dtype, False, plain=True, H=H)
        tapped, _, _ = _loop(mode, dtype, False, H=H)
        got, _, _ = _loop(mode, dtype, True, H=H, columns=columns)
    with torch.enable_grad():
        graph, _, _ = _loop(mode, dtype, True, H=H, columns=columns)
    for a, b, c, d in zip(want, tapped, got, graph, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("mode", sorted(_FUNCS))
def test_cell_step_gradients_are_torchs(mode, columns):
    """The gradients at every step's input projection, at the weights and at the first state,
    of ``columns`` batched columns of both outputs: those of torch's cell (float64)."""
    g = torch.Generator().manual_seed(5)
    grads = []
    for ours in (False, True):
        outs, taps, leaves = _loop(mode, torch.float64, ours)
        flat = torch.cat([o for o in outs], -1)
        cot = torch.randn(columns, *flat.shape, generator=g.manual_seed(5), dtype=flat.dtype)
        want = [*taps, *(t for t in leaves if t is not None)]
        if columns == 1:
            got = torch.autograd.grad(flat, want, cot[0], allow_unused=True)
        else:
            got = stream.batched_grads(flat, want, cot, False)
        grads.append(got)
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.abs().sum() > 0
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_cell_step_backward_is_not_differentiable_again():
    outs, taps, _ = _loop("GRU", torch.float64, True)
    (g,) = torch.autograd.grad(outs[0].sum(), taps[-1], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), taps[0])


@pytest.mark.parametrize("kind", ["gru", "lstm", "tanh", "relu"])
def test_engine_steps_take_the_cell_step_after_a_batched_backward(kind, monkeypatch):
    """EXACT (several columns): the first step runs torch's cells, the later ones this module's
    nodes (not a ReLU cell's), both the oracle's Fisher; EMPIRICAL (one column) torch's cells."""
    from cases import check_fast_twice
    from oracle import oracle
    from test_cells import Loop, _case, _cell
    from tolerances import DET_REL_F64

    from fimfast.rules import cell_steps

    seen = []
    for cls in (cell_steps._GRU, cell_steps._LSTM, cell_steps._Tanh):
        monkeypatch.setattr(cls, "apply", (lambda f: lambda *a: seen.append(1) or f(*a))(
            cls.apply))
    case = _case(Loop(_cell(kind), h0="input"), 6)
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    assert not seen
    est = check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)
    assert len(seen) == (0 if kind == "relu" else 6)  # the second step's six calls
    assert est._persample.columns > 1


@pytest.mark.parametrize("kind", ["gru", "lstm", "tanh"])
def test_train_step_gradients_through_the_cell_step(kind):
    """``train_step`` (the loss backward through the captured forward) after a batched step:
    the parameters' ``.grad`` those of a plain training step, the Fisher the oracle's."""
    import copy

    from oracle import oracle, rel_error
    from test_cells import Loop, _case, _cell
    from tolerances import DET_REL_F64

    import fimfast

    case = _case(Loop(_cell(kind), h0="input"), 6)
    ref_model = copy.deepcopy(case.model)
    est = fimfast.DiagFisher(case.model, "exact", class_dim=-1)
    x, y = case.batch
    for _ in range(2):
        est.train_step((x, y))
        F.cross_entropy(ref_model(x), y).backward()
    assert est._persample.columns > 1  # the second step ran the cell step's nodes
    for (name, p), q in zip(case.model.named_parameters(), ref_model.parameters(), strict=True):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    got = {k: v / 2 for k, v in est.result().items()}
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
