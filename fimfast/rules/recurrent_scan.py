"""One autograd node per recurrent layer and direction: torch's fused forward, a written-out
backward.

:func:`fimfast.rules.recurrent._direction` needs the gradient at the gate pre-activations of
every step (docs/math.md §4, "Recurrent layers"). Run as unrolled cells, a layer puts about ten
autograd nodes per step in the graph, and every backward walks them one by one. Here the steps of
one layer and direction are one :class:`torch.autograd.Function`, :class:`Scan`:

* its forward is torch's own fused kernel of the layer (``torch._VF.lstm``, ``gru``,
  ``rnn_tanh``, ``rnn_relu``: oneDNN on a CPU, cuDNN on a GPU), run without a graph on the
  layer's input and weights; it keeps the outputs ``h_t``;
* its backward is back-propagation through time written out for the cell. What does not depend
  on the incoming gradient is computed for all steps at once (the gate pre-activations
  ``a_t = gi_t + W_hh h_{t-1} + b_hh`` as one product, the gates and their derivatives, an
  LSTM's cell states ``c_t = f_t c_{t-1} + i_t g_t``); per step only the recurrence is left: a
  few elementwise ops and one product with ``W_hh``.

Its inputs are the tapped input projections ``gi`` ``(T, N, G)`` (the engine's tap: their
gradient is the gradient at the gate pre-activations), the initial state, ``W_hh`` and ``b_hh``;
the gradients it returns for them are those of the unrolled cells, to rounding. The backward is
made of functional ops, so a batched backward (``autograd.grad(..., is_grads_batched=True)``)
runs it under vmap, with the ops that vmap batches (:class:`_Fused`). Used for every layer and
direction but an LSTM with ``proj_size``, a ``PackedSequence`` input and a forward under autocast
(:func:`applies`), which keep the unrolled cells.
"""

from __future__ import annotations

import warnings

import torch


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


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


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
        ys, hT, cT = _fused(mode, reverse, fwd, h0, c0, whh, bhh)
        ctx.mode, ctx.reverse = mode, reverse
        ctx.save_for_backward(gi, h0, whh, bhh, ys, *(() if c0 is None else (c0,)))
        return (ys, hT) if c0 is None else (ys, hT, cT)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dys, dhT, dcT=None):
        gi, h0, whh, bhh, ys, *c0 = ctx.saved_tensors
        hprev = _prev(ys, h0, ctx.reverse)
        T, N, H = hprev.shape
        gh = torch.addmm(bhh, hprev.reshape(T * N, H), whh.t()).view(gi.shape)
        if ctx.mode == "LSTM":
            dG, dh0, dc0 = _lstm_bptt(gi + gh, c0[0], whh, dys, dhT, dcT, ctx.reverse)
            dgh = dG
        elif ctx.mode == "GRU":
            dG, dgh, dh0 = _gru_bptt(gi, gh, hprev, whh, dys, dhT, ctx.reverse)
            dc0 = None
        else:
            dG, dh0 = _rnn_bptt(ys, ctx.mode, whh, dys, dhT, ctx.reverse)
            dgh, dc0 = dG, None
        dW = dgh.reshape(T * N, -1).t().mm(hprev.reshape(T * N, H)) if _wanted(ctx, 5) else None
        db = dgh.sum((0, 1)) if _wanted(ctx, 6) else None
        return (None, None, None, dG, dh0, dW, db) + (() if dc0 is None else (dc0,))


def _wanted(ctx, i: int) -> bool:
    """Whether this backward wants the gradient of input ``i`` (``W_hh``, ``b_hh``): the engine's
    backward to the taps alone does not, a training backward does."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i - 3][0]  # the graph's edges: the tensor inputs, from gi on
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # not in a backward this torch can tell about
        return True


def _prev(seq: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state each step started from, in position order (``first`` at the first step run)."""
    first = first.unsqueeze(0)
    return torch.cat([seq[1:], first]) if reverse else torch.cat([first, seq[:-1]])


def _stack(parts: list, backwards: bool) -> torch.Tensor:
    """The per-step ``parts`` collected in the order ``_steps(T, backwards)`` gives, stacked
    in position order."""
    return torch.stack(parts[::-1] if backwards else parts)


def _lstm_bptt(a, c0, whh, dys, dhT, dcT, reverse: bool):
    """``(dG (T, N, 4H), dh0, dc0)`` of the LSTM from its gate pre-activations ``a``; the cell
    states are recomputed from the gates (``c_t = f_t c_{t-1} + i_t g_t``)."""
    T, N, G = a.shape
    H = G // 4
    s = a.sigmoid()
    ds = s * (1 - s)
    i, f, o = s[..., :H], s[..., H : 2 * H], s[..., 3 * H :]
    g = a[..., 2 * H : 3 * H].tanh()
    ig = i * g
    fs = f.unbind(0)
    c, cs = c0, [None] * T
    for t, igt in zip(_steps(T, reverse), _order(ig.unbind(0), reverse)):
        c = cs[t] = torch.addcmul(igt, fs[t], c)
    cseq = torch.stack(cs)
    tc = cseq.tanh()
    dc_dh = torch.addcmul(o, o * tc, tc, value=-1).unbind(0)  # o (1 - tanh(c)^2) = dc / dh
    # d a / d c (the i, f, g blocks) and d a / d h (the o block), as (N, 4H) per step
    k = torch.cat([g * ds[..., :H], _prev(cseq, c0, reverse) * ds[..., H : 2 * H],
                   torch.addcmul(i, ig, g, value=-1), tc * ds[..., 3 * H :]], -1).unbind(0)
    back = list(_steps(T, not reverse))
    dy = _order(dys.unbind(0), not reverse)
    dh, dc = dy[0] + dhT, dcT
    fma = _fma(dys, dhT, dcT)
    out: list = []
    for j, t in enumerate(back):
        dc = fma.cmul(dc, dh, dc_dh[t])
        dGt = torch.cat([dc, dc, dc, dh], 1) * k[t]
        out.append(dGt)
        dc = dc * fs[t]
        dh = dGt.mm(whh) if j + 1 == T else fma.mm(dy[j + 1], dGt, whh)
    dG = _stack(out, not reverse)
    return dG, dh, dc


class _Fused:
    """``addcmul`` and ``addmm``: torch's fused ops, or for a gradient batched by the legacy
    vmap of ``autograd.grad(..., is_grads_batched=True)`` (which has no batching rule for them
    and would loop over the batch) the same as a product and a sum."""

    def __init__(self, batched: bool):
        self.batched = batched

    def cmul(self, a, b, c):
        return a + b * c if self.batched else torch.addcmul(a, b, c)

    def mm(self, a, b, c):
        return a + b.mm(c) if self.batched else torch.addmm(a, b, c)


def _fma(*ts) -> _Fused:
    """The ops for the incoming gradients ``ts`` (batched if any of them is)."""
    keys = (str(torch._C._dispatch_keys(t)) for t in ts if t is not None)
    return _Fused(any("Batched" in k.removeprefix("DispatchKeySet(").rstrip(")").split(", ")
                      for k in keys))


def _order(parts, reverse: bool):
    return parts[::-1] if reverse else parts


def _gru_bptt(gi, gh, hprev, whh, dys, dhT, reverse: bool):
    """``(dG, dG^h, dh0)`` of the GRU: the gradients at the input-side and hidden-side gate
    pre-activations (they differ in the candidate block, scaled by ``r_t`` on the hidden side)."""
    H = hprev.shape[-1]
    r, z = (gi[..., : 2 * H] + gh[..., : 2 * H]).sigmoid().chunk(2, -1)
    ghn = gh[..., 2 * H :]
    n = torch.addcmul(gi[..., 2 * H :], r, ghn).tanh()
    dn = (1 - z) * (1 - n * n)  # d n-pre / d h_t
    dr = dn * ghn * r * (1 - r)
    dz = (hprev - n) * z * (1 - z)
    T, N = hprev.shape[:2]
    kh = torch.stack([dr, dz, dn * r], 2)  # d (hidden-side pre-activations) / d h_t
    dh = dhT
    hs: list = []
    zs, khs = z.unbind(0), kh.unbind(0)
    fma = _fma(dys, dhT)
    for t, dy in zip(_steps(T, not reverse), _order(dys.unbind(0), not reverse)):
        dh = dy + dh
        hs.append(dh)
        dh = fma.mm(dh * zs[t], (dh.unsqueeze(1) * khs[t]).view(N, 3 * H), whh)
    D = _stack(hs, not reverse).unsqueeze(2)
    dgh = (D * kh).reshape(T, N, 3 * H)
    dG = (D * torch.stack([dr, dz, dn], 2)).reshape(T, N, 3 * H)
    return dG, dgh, dh


def _rnn_bptt(ys, mode: str, whh, dys, dhT, reverse: bool):
    """``(dG, dh0)`` of the Elman cells (``tanh`` or ``relu``)."""
    d = (1 - ys * ys if mode == "RNN_TANH" else (ys > 0).to(ys.dtype)).unbind(0)
    dh = dhT
    out: list = []
    for t, dy in zip(_steps(ys.shape[0], not reverse), _order(dys.unbind(0), not reverse)):
        dGt = (dy + dh) * d[t]
        out.append(dGt)
        dh = dGt.mm(whh)
    return _stack(out, not reverse), dh
