"""One autograd node per recurrent layer and direction: torch's fused forward, a written-out
backward.

:func:`fimfast.rules.recurrent._direction` needs the gradient at the gate pre-activations of
every step (docs/math.md §4, "Recurrent layers"). Run as unrolled cells, a layer puts about ten
autograd nodes per step in the graph, and every backward walks them one by one. Here the steps of
one layer and direction are one :class:`torch.autograd.Function`, :class:`Scan`:

* its forward, for an LSTM or a GRU on the CPU, is :func:`fimfast.ops.recurrent_forward` (one
  call of the ``cpp`` kernel ``csrc/cpu/recurrent_forward.cpp``) on the tapped input
  projections: it keeps the outputs ``h_t`` and the gate pre-activations of every step;
  elsewhere (a GPU, an Elman layer, the ``torch`` backend) torch's own fused kernel of the layer
  (``torch._VF.lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``: oneDNN on a CPU, cuDNN on a GPU), run
  without a graph on the layer's input and weights, which keeps the outputs only;
* its backward is back-propagation through time written out for the cell: the hidden-side gate
  pre-activations ``W_hh h_{t-1} + b_hh`` of all steps as one product where the forward did not
  keep them, then :func:`fimfast.ops.recurrent_bptt` (the recurrence; on the CPU one call of the
  ``cpp`` kernel, ``csrc/cpu/recurrent_bptt.cpp``, else a loop of torch ops per step,
  :mod:`fimfast.ops.recurrent`).

Its inputs are the tapped input projections ``gi`` ``(T, N, G)`` (the engine's tap: their
gradient is the gradient at the gate pre-activations), the initial state, ``W_hh`` and ``b_hh``;
the gradients it returns for them are those of the unrolled cells, to rounding. A batched
backward (``autograd.grad(..., is_grads_batched=True)``, the legacy vmap) runs its columns as
rows of one recurrence (the ``cpp`` kernel's Batched rule; the reference's ops are ones vmap
batches). Used for every layer and direction but an LSTM with ``proj_size``, a
``PackedSequence`` input and a forward under autocast (:func:`applies`), which keep the unrolled
cells.
"""

from __future__ import annotations

import warnings

import torch

from fimfast import ops
from fimfast.ops import registry
from fimfast.ops.recurrent import prev
from fimfast.rules.node_edges import input_wanted


def applies(mode: str, whr, masks, device: torch.device) -> bool:
    """Whether a layer and direction runs as one :class:`Scan` node: not for an LSTM with
    ``proj_size`` (``whr``), a ``PackedSequence`` input (``masks``), nor under autocast (which
    would run the fused kernel in another dtype than the backward's products)."""
    return (mode in _FUSED and whr is None and masks is None
            and not torch.is_autocast_enabled(device.type))


def run(mode: str, x, gi, h0, c0, W: dict, whh, bhh, reverse: bool):
    """``(outputs (T, N, H) in position order, last h, last c)`` of one layer and direction:
    ``x`` ``(T, N, I)`` its input, ``gi`` the tapped input projections ``W_ih x_t + b_ih`` of
    the steps in position order, ``W`` its weights (:func:`fimfast.rules.recurrent._weights`),
    ``whh`` and ``bhh`` the views of ``W_hh`` and ``b_hh`` the graph reaches them through."""
    wih = W["weight_ih"].detach()
    bih = None if W["bias_ih"] is None else W["bias_ih"].detach()
    if bhh is None:
        bhh = torch.zeros(whh.shape[0], dtype=whh.dtype, device=whh.device)
    fwd = (x.detach(), wih, bih)
    if c0 is None:
        ys, hT = Scan.apply(mode, reverse, fwd, gi, h0, whh, bhh)
        return ys, hT, None
    return Scan.apply(mode, reverse, fwd, gi, h0, whh, bhh, c0)


_FUSED = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
          "RNN_RELU": torch._VF.rnn_relu}


def _fused(mode: str, reverse: bool, fwd: tuple, h0, c0, whh, bhh):
    """torch's own forward of one layer and direction (its fused kernel), without a graph:
    ``(outputs (T, N, H) in position order, last h, last c)``."""
    x, wih, bih = fwd
    ws = [wih, whh.detach()] + ([] if bih is None else [bih, bhh.detach()])
    x = x.flip(0) if reverse else x
    hx = h0.unsqueeze(0) if c0 is None else (h0.unsqueeze(0), c0.unsqueeze(0))
    if x.device.type == "cpu":
        out = _FUSED[mode](x, hx, ws, bih is not None, 1, 0.0, False, False, False)
    else:  # cuDNN warns, at every call, that these weights are not one flattened buffer
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single contiguous chunk of memory")
            out = _FUSED[mode](x, hx, ws, bih is not None, 1, 0.0, False, False, False)
    ys = out[0].flip(0) if reverse else out[0]
    if c0 is None:
        return ys, out[1][0], None
    return ys, out[1][0], out[2][0]


class Scan(torch.autograd.Function):
    """The steps of one recurrent layer and direction as one node (see the module docstring).

    ``apply(mode, reverse, (x, W_ih, b_ih), gi, h0, whh, bhh[, c0])`` returns
    ``(ys, hT[, cT])``; ``x``, ``W_ih``, ``b_ih`` only feed torch's fused forward, the gradient
    reaches them through ``gi``."""

    @staticmethod
    def forward(ctx, mode, reverse, fwd, gi, h0, whh, bhh, c0=None):
        kernel = _own_forward(mode, gi)
        if kernel is not None:
            ys, pre, hT, cT = kernel(mode, gi, h0, c0, whh, bhh, reverse)
        else:
            (ys, hT, cT), pre = _fused(mode, reverse, fwd, h0, c0, whh, bhh), None
        ctx.mode, ctx.reverse = mode, reverse
        ctx.save_for_backward(gi, h0, whh, bhh, ys, pre, *(() if c0 is None else (c0,)))
        return (ys, hT) if c0 is None else (ys, hT, cT)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dys, dhT, dcT=None):
        gi, h0, whh, bhh, ys, pre, *c0 = ctx.saved_tensors
        wanted = input_wanted(ctx, 5, 3), input_wanted(ctx, 6, 3)
        hprev, saved = getattr(ctx, "gates", None) or _gates(ctx.mode, ctx.reverse, gi, h0, whh,
                                                             bhh, ys, c0, pre)
        if not any(wanted):
            # the engine's backward to the taps, which a step may run once per column (streamed
            # columns): the gates are kept for the next ones, with the graph of the step
            ctx.gates = hprev, saved
        T, N, H = hprev.shape
        dG, dgh, dh0, dc0 = ops.recurrent_bptt(ctx.mode, saved, whh, dys, dhT, dcT, ctx.reverse)
        dgh = dG if dgh is None else dgh
        dW = dgh.reshape(T * N, -1).t().mm(hprev.reshape(T * N, H)) if wanted[0] else None
        db = dgh.sum((0, 1)) if wanted[1] else None
        return (None, None, None, dG, dh0, dW, db) + (() if dc0 is None else (dc0,))


def _gates(mode: str, reverse: bool, gi, h0, whh, bhh, ys, c0: list, pre=None):
    """``(hprev, saved)``: the state each step started from and the saved tensors of
    :func:`fimfast.ops.recurrent_bptt`: the pre-activations ``pre`` the forward kept, or
    without them (torch's fused forward) the hidden-side ones of all steps as one product."""
    hprev = prev(ys, h0, reverse)
    if mode not in ("LSTM", "GRU"):
        return hprev, [ys]
    if pre is None:
        T, N, H = hprev.shape
        gh = torch.addmm(bhh, hprev.reshape(T * N, H), whh.t()).view(gi.shape)
        pre = gi + gh if mode == "LSTM" else gh
    return hprev, ([pre, c0[0]] if mode == "LSTM" else [gi, pre, hprev])


def _own_forward(mode: str, gi: torch.Tensor):
    """The ``cpp`` implementation of :func:`fimfast.ops.recurrent_forward` when :class:`Scan`
    runs it (the pre-activations come with the outputs) rather than torch's fused kernel, else
    ``None``: on the CPU, float32 or float64, where the ``cpp`` backend is the one chosen (with
    the ``torch`` backend, a Python loop per step, the fused kernel and one product in the
    backward cost less). An Elman layer's backward needs no pre-activation: it keeps the fused
    kernel. Its arguments are :class:`Scan`'s own, valid by construction: the function is called
    as it is, without the checks of the public op."""
    if mode not in ("LSTM", "GRU") or gi.device.type != "cpu":
        return None
    if gi.dtype not in (torch.float32, torch.float64):
        return None
    try:
        name, fn = registry.resolve("recurrent_forward", None, gi.device)
    except registry.BackendUnavailableError:  # FIMFAST_BACKEND=cpp without the extension
        return None
    return fn if name == "cpp" else None

