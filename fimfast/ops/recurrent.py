"""The ``torch`` references of :func:`fimfast.ops.recurrent_bptt`, back-propagation through time
of one recurrent layer and direction, the recurrence as a loop of ATen ops per step, and of
:func:`fimfast.ops.recurrent_forward`, the steps that keep their pre-activations.

What does not depend on the incoming gradient is computed for all steps at once (the gates and
their derivatives, an LSTM's cell states ``c_t = f_t c_{t-1} + i_t g_t``); per step only the
recurrence is left: a few elementwise ops and one product with ``W_hh`` (docs/math.md §4,
"Recurrent layers"). The ``cpp`` backend (``csrc/cpu/recurrent_bptt.cpp``) runs the same
operations in the same order in one call.

The loop is made of functional ops, so a batched backward (``autograd.grad(...,
is_grads_batched=True)``) runs it under the legacy vmap, with the ops that vmap batches
(:class:`_Fused`).
"""

from __future__ import annotations

import torch


def recurrent_bptt_torch(mode: str, saved: list, whh, dys, dh, dc, reverse: bool):
    """:func:`fimfast.ops.recurrent_bptt` with torch ops: ``(dG, dgh or None, dh0, dc0 or
    None)``."""
    if mode == "LSTM":
        a, c0 = saved
        dG, dh0, dc0 = _lstm_bptt(a, c0, whh, dys, dh, dc, reverse)
        return dG, None, dh0, dc0
    if mode == "GRU":
        gi, gh, hprev = saved
        dG, dgh, dh0 = _gru_bptt(gi, gh, hprev, whh, dys, dh, reverse)
        return dG, dgh, dh0, None
    dG, dh0 = _rnn_bptt(saved[0], mode, whh, dys, dh, reverse)
    return dG, None, dh0, None


def recurrent_forward_torch(mode: str, gi, h0, c0, whh, bhh, reverse: bool):
    """:func:`fimfast.ops.recurrent_forward` with torch ops, one step at a time: ``(ys, pre, hT,
    cT or None)``. The order of the operations is that of the ``cpp`` kernel
    (``csrc/cpu/recurrent_forward.cpp``) and of the gates :func:`_lstm_bptt` and
    :func:`_gru_bptt` recompute from ``pre``."""
    T, H = gi.shape[0], whh.shape[1]
    if mode == "GRU":  # the hidden side alone: b_hh, then W_hh h
        base = gi.new_zeros(gi.shape) if bhh is None else bhh.expand(gi.shape)
    else:
        base = gi if bhh is None else gi + bhh
    pres: list = [None] * T
    ys: list = [None] * T
    h, c, w = h0, c0, whh.t()
    for t in steps(T, reverse):
        p = pres[t] = torch.addmm(base[t], h, w)
        if mode == "LSTM":
            s = p.sigmoid()
            c = torch.addcmul(s[:, :H] * p[:, 2 * H : 3 * H].tanh(), s[:, H : 2 * H], c)
            h = s[:, 3 * H :] * c.tanh()
        elif mode == "GRU":
            r, z = (gi[t, :, : 2 * H] + p[:, : 2 * H]).sigmoid().chunk(2, 1)
            n = torch.addcmul(gi[t, :, 2 * H :], r, p[:, 2 * H :]).tanh()
            h = torch.addcmul(n, z, h - n)
        else:
            h = p.tanh() if mode == "RNN_TANH" else p.relu()
        ys[t] = h
    if T == 0:
        return gi.new_empty((0, *h0.shape)), base.clone(), h0.clone(), c
    return torch.stack(ys), torch.stack(pres), h, c


def steps(T: int, reverse: bool) -> range:
    """The steps of a layer in the order its forward runs them."""
    return range(T - 1, -1, -1) if reverse else range(T)


def prev(seq: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state each step started from, in position order (``first`` at the first step run)."""
    first = first.unsqueeze(0)
    return torch.cat([seq[1:], first]) if reverse else torch.cat([first, seq[:-1]])


def _stack(parts: list, backwards: bool) -> torch.Tensor:
    """The per-step ``parts`` collected in the order ``steps(T, backwards)`` gives, stacked
    in position order."""
    return torch.stack(parts[::-1] if backwards else parts)


def _order(parts, reverse: bool):
    return parts[::-1] if reverse else parts


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
    for t, igt in zip(steps(T, reverse), _order(ig.unbind(0), reverse)):
        c = cs[t] = torch.addcmul(igt, fs[t], c)
    cseq = torch.stack(cs)
    tc = cseq.tanh()
    dc_dh = torch.addcmul(o, o * tc, tc, value=-1).unbind(0)  # o (1 - tanh(c)^2) = dc / dh
    # d a / d c (the i, f, g blocks) and d a / d h (the o block), as (N, 4H) per step
    k = torch.cat([g * ds[..., :H], prev(cseq, c0, reverse) * ds[..., H : 2 * H],
                   torch.addcmul(i, ig, g, value=-1), tc * ds[..., 3 * H :]], -1).unbind(0)
    back = list(steps(T, not reverse))
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
    for t, dy in zip(steps(T, not reverse), _order(dys.unbind(0), not reverse)):
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
    for t, dy in zip(steps(ys.shape[0], not reverse), _order(dys.unbind(0), not reverse)):
        dGt = (dy + dh) * d[t]
        out.append(dGt)
        dh = dGt.mm(whh)
    return _stack(out, not reverse), dh
