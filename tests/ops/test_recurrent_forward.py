"""fimfast.ops.recurrent_forward: the ``cpp`` kernel (csrc/cpu/recurrent_forward.cpp) against the
torch reference (fimfast/ops/recurrent.py) and both against torch's own layer (``nn.LSTM``,
``nn.GRU``, ``nn.RNN`` with the same weights): the outputs and last states to float64 rounding,
the kept pre-activations against ``W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` formed from torch's
outputs (the GRU: its hidden side), both directions, float32 against float64. End to end (the
``Scan`` node's forward): tests/test_recurrent_scan.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_backends import require
from torch import nn

from fimfast import ops

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
T, N, I, H = 6, 3, 2, 4


def _layer(mode: str, bias: bool) -> nn.RNNBase:
    torch.manual_seed(0)
    if mode == "LSTM":
        return nn.LSTM(I, H, bias=bias).double()
    if mode == "GRU":
        return nn.GRU(I, H, bias=bias).double()
    return nn.RNN(I, H, bias=bias, nonlinearity=mode[4:].lower()).double()


def _case(mode: str, bias: bool, seed: int = 0):
    """``(layer, x, gi, h0, c0, whh, bhh)``: ``gi`` the layer's input projections."""
    layer = _layer(mode, bias)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(N, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(N, H, generator=g, dtype=torch.float64) if mode == "LSTM" else None
    with torch.no_grad():
        gi = F.linear(x, layer.weight_ih_l0, layer.bias_ih_l0 if bias else None)
    whh = layer.weight_hh_l0.detach()
    bhh = layer.bias_hh_l0.detach() if bias else None
    return layer, x, gi, h0, c0, whh, bhh


def _torch_layer(layer, x, h0, c0, reverse):
    """torch's own forward of the layer: ``(ys, hT, cT)`` in position order."""
    xs = x.flip(0) if reverse else x
    hx = h0.unsqueeze(0) if c0 is None else (h0.unsqueeze(0), c0.unsqueeze(0))
    with torch.no_grad():
        ys, hn = layer(xs, hx)
    ys = ys.flip(0) if reverse else ys
    return (ys, hn[0][0], hn[1][0]) if c0 is not None else (ys, hn[0], None)


def _close(a, b, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * (1 + float(b.abs().max()))


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_both_backends_equal_torch_layer_float64(mode, reverse, bias):
    """Outputs and last states equal torch's layer; the pre-activations are those the outputs
    imply; the cpp kernel equals the reference."""
    require("cpp")
    layer, x, gi, h0, c0, whh, bhh = _case(mode, bias)
    ys, hT, cT = _torch_layer(layer, x, h0, c0, reverse)
    hprev = torch.cat([ys[1:], h0[None]]) if reverse else torch.cat([h0[None], ys[:-1]])
    gh = F.linear(hprev, whh, bhh)
    pre = gh if mode == "GRU" else gi + gh
    for backend in ("torch", "cpp"):
        got = ops.recurrent_forward(mode, gi, h0, c0, whh, bhh, reverse, backend=backend)
        for a, b in zip(got, (ys, pre, hT, cT), strict=True):
            assert _close(a, b, 1e-13), backend
    ref = ops.recurrent_forward(mode, gi, h0, c0, whh, bhh, reverse, backend="torch")
    got = ops.recurrent_forward(mode, gi, h0, c0, whh, bhh, reverse, backend="cpp")
    for a, b in zip(got, ref, strict=True):
        assert _close(a, b, 1e-14)


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("bias", [True, False])
def test_strided_projections_equal_contiguous(mode, bias):
    """``gi`` as a transposed view of a batch-first projection (what the recurrent rule passes
    for a batch-first input: fimfast/rules/recurrent.py, ``_projection``) gives exactly the
    results of the same values laid out time-major."""
    require("cpp")
    _, _, gi, h0, c0, whh, bhh = _case(mode, bias)
    strided = gi.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous() and torch.equal(strided, gi)
    for backend in ("torch", "cpp"):
        ref = ops.recurrent_forward(mode, gi, h0, c0, whh, bhh, True, backend=backend)
        got = ops.recurrent_forward(mode, strided, h0, c0, whh, bhh, True, backend=backend)
        for a, b in zip(got, ref, strict=True):
            assert (a is None and b is None) or torch.equal(a, b), backend


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_float32_against_float64(mode):
    require("cpp")
    _, _, gi, h0, c0, whh, bhh = _case(mode, True)
    ref = ops.recurrent_forward(mode, gi, h0, c0, whh, bhh, True, backend="cpp")
    f = [None if t is None else t.float() for t in (gi, h0, c0, whh, bhh)]
    got = ops.recurrent_forward(mode, *f[:4], f[4], True, backend="cpp")
    for a, b in zip(got, ref, strict=True):
        assert a is None and b is None or (a.dtype == torch.float32 and _close(a.double(), b, 1e-5))


def test_no_step_returns_the_initial_state():
    require("cpp")
    _, _, gi, h0, c0, whh, bhh = _case("LSTM", True)
    for backend in ("torch", "cpp"):
        ys, pre, hT, cT = ops.recurrent_forward("LSTM", gi[:0], h0, c0, whh, bhh,
                                                backend=backend)
        assert ys.shape == (0, N, H) and pre.shape == (0, N, 4 * H)
        assert torch.equal(hT, h0) and torch.equal(cT, c0)


def test_bad_arguments_name_the_argument():
    require("cpp")
    _, _, gi, h0, c0, whh, bhh = _case("LSTM", True)
    with pytest.raises(ValueError, match="mode"):
        ops.recurrent_forward("LSTMX", gi, h0, c0, whh, bhh)
    with pytest.raises(ValueError, match="c0"):
        ops.recurrent_forward("LSTM", gi, h0, None, whh, bhh)
    with pytest.raises(ValueError, match="gi"):
        ops.recurrent_forward("LSTM", gi[..., :3], h0, c0, whh, bhh)
    with pytest.raises(ValueError, match="whh"):
        ops.recurrent_forward("GRU", gi[..., : 3 * H], h0, None, whh, bhh)
    op = torch.ops.fimfast.recurrent_forward
    with pytest.raises(RuntimeError, match="h0"):
        op("LSTM", gi, h0[:2], c0, whh, bhh, False)
    with pytest.raises(RuntimeError, match="bhh"):
        op("LSTM", gi, h0, c0, whh, bhh[:3], False)
    with pytest.raises(RuntimeError, match="dtype"):
        op("LSTM", gi.float(), h0, c0, whh, bhh, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op("LSTM", gi.half(), h0.half(), c0.half(), whh.half(), bhh.half(), False)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_opcheck(mode):
    require("cpp")
    import fimfast.ops.cpp  # noqa: F401  (loads the extension and its fake implementations)

    _, _, gi, h0, c0, whh, bhh = _case(mode, True)
    args = [None if t is None else t.float() for t in (gi, h0, c0, whh, bhh)]
    torch.library.opcheck(torch.ops.fimfast.recurrent_forward, (mode, *args, True))
