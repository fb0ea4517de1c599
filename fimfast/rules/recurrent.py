"""Rules for ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: the layer replayed with tapped gate inputs.

A recurrent layer shares its weights over time like a linear layer over tokens: the gradient of
one unit ``(column m, sample n)`` is ``sum_t P[m, n, t] (x) x_t`` for ``W_ih`` and
``sum_t P_h[m, n, t] (x) h_{t-1}`` for ``W_hh``, with ``P`` the gradient at the gate
pre-activations at step ``t`` (docs/math.md §4, "Recurrent layers"). To get ``P`` for every
backward column at once, the module's forward is replaced during a capture by
:func:`_rnn_forward`, which computes the same function as torch's own forward with the input
projections of all steps as one tapped ``F.linear`` and the steps fed with them (the tap's
gradient is the gradient at the gate pre-activations). ``W_hh`` sees the same gradient except
for the GRU's candidate gate, whose hidden part is multiplied by the reset gate ``r_t``; an
LSTM's projection ``W_hr`` gets a second tap on the projected hidden state of every step. The
steps of one layer and direction are one autograd node, torch's fused kernel forward and a
written-out backward (:mod:`fimfast.rules.recurrent_scan`); an LSTM with ``proj_size`` and a
``PackedSequence`` input run as unrolled cells instead, each step a node of autograd's graph.

Handled: every mode (``RNN_TANH``, ``RNN_RELU``, ``LSTM``, ``GRU``), any ``num_layers``,
``bidirectional``, ``batch_first`` either way, ``bias`` on or off, ``proj_size``, an initial
state given or not, dropout between layers in train mode (drawn as torch's own forward draws
it: the same mask for the same random state), and a ``PackedSequence`` input (replayed padded,
each sample's state kept once its sequence has ended, the output packed again). An unbatched
input, or a ``PackedSequence`` with dropout between layers in train mode (torch draws that mask
on the packed data), runs torch's own forward, and the layer's parameters then take the generic
path.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from fimfast import recompute
from fimfast.hooks import Call, Capture, Tap, Use, saved_tensor_hooks_active
from fimfast.rules import recurrent_scan
from fimfast.rules.base import (
    Outer,
    Rule,
    Term,
    UseKind,
    Vec,
    front,
    patch_forward,
    trainable,
)

# gates per mode: rows of W_ih / W_hh are (gates * hidden_size)
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
_ROLES = ("weight_ih", "bias_ih", "weight_hh", "bias_hh", "weight_hr")


class RecurrentRule(Rule):
    """``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: their forward runs as :func:`_rnn_forward` during
    a capture (see the module docstring for what runs torch's own forward instead)."""

    name = "recurrent"
    takes_functions = True  # its terms tell uses apart by position or kind

    def accepts(self, module):
        return getattr(module, "mode", None) in _GATES

    def install(self, module, cap):
        return patch_forward(module, partial(_rnn_forward, self, module, cap))

    def terms(self, call, grads):
        data = call.data
        P: dict[int, tuple] = {}  # per layer and direction: (gate gradient, hidden-side one)
        sums: dict[int, Vec] = {}  # sum over steps, per gradient (b_ih and b_hh share one but GRU)
        out: list[Term | None] = []
        for k, role in data["src"]:
            d = data["dirs"][k]
            if role == "weight_hr":
                out.append(_proj_term(d, grads[d["htap"]]))
                continue
            if k not in P:
                P[k] = _gate_grads(call.module.mode, d, grads[d["gate"]])
            Pi, Ph = P[k]
            if Pi is None:
                out.append(None)
            elif role == "weight_ih":
                out.append(Outer(Pi, _side(d, "x")))
            elif role == "weight_hh":
                out.append(Outer(Ph, _side(d, "hp")))
            else:
                Pb = Pi if role == "bias_ih" else Ph
                if id(Pb) not in sums:
                    sums[id(Pb)] = Vec(Pb.sum(2))
                out.append(sums[id(Pb)])
        return out


def _gate_grads(mode: str, d: dict, G: torch.Tensor | None):
    """``(P, P_h)``: the gradient ``(M, N, T, gates * H)`` at the gate pre-activations, and at
    the hidden-side pre-activations (the GRU's candidate part scaled by the reset gate)."""
    if G is None:
        return None, None
    if mode != "GRU":
        return G, G
    H = G.shape[-1] // 3
    r = _side(d, "r")
    return G, torch.cat([G[..., : 2 * H], G[..., 2 * H :] * r], dim=-1)


def _proj_term(d: dict, G: torch.Tensor | None) -> Term | None:
    return None if G is None else Outer(G, _side(d, "hraw"))


def _side(d: dict, name: str) -> torch.Tensor:
    """The input side ``(N, T, *)`` named ``name`` of one layer and direction, formed once per
    step from the time-major tensors the forward kept."""
    key = ("Q", name)
    if key not in d:
        if name == "hp":
            d[key] = front(_hprev(d), 1, 2)
        else:
            d[key] = front(d[name], 1, 2)
    return d[key]


def _hprev(d: dict) -> torch.Tensor:
    """The hidden state each step started from, ``(T, N, Hout)`` in position order: ``h_{t-1}``,
    or ``h_{t+1}`` for the reverse direction (``h0`` at the first step run)."""
    h0, hs = d["h0"].unsqueeze(0), d["hs"]
    return torch.cat([hs[1:], h0]) if d["reverse"] else torch.cat([h0, hs[:-1]])


class _Recorder:
    """The taps, uses and data of one :func:`_rnn_forward` call, layer and direction at a time."""

    def __init__(self, mod: nn.RNNBase, cap: Capture, tracked: set[int]):
        self.mod, self.cap, self.tracked = mod, cap, tracked
        self.taps: list[Tap] = []
        self.uses: list[Use] = []
        self.data: dict[str, Any] = {"src": [], "dirs": []}
        self.masks: tuple | None = None  # per step, the samples still running (packed input)

    def declare(self, k: int, W: dict) -> None:
        for role in _ROLES:
            p = W.get(role)
            if p is not None and id(p) in self.tracked:
                kind = UseKind.OUTER if role.startswith("weight") else UseKind.VEC
                self.uses.append(Use(p, kind))
                self.data["src"].append((k, role))

    def gate_tap(self, gi: torch.Tensor, k: int) -> torch.Tensor:
        """Tap the input projection ``gi`` ``(T, N, G)`` (batch first for the engine)."""
        key = (id(self.mod), "gates", k)
        tap, out = self.cap.tap(gi.transpose(0, 1), lead=2, key=key, batch_first=True)
        self.taps.append(tap)
        return out.transpose(0, 1)

    def time_tap(self, T: int, N: int, P: int, like: torch.Tensor, k: int) -> torch.Tensor:
        """A zero ``(N, T, P)`` whose step ``t`` is added to the projected hidden state of step
        ``t``: its gradient is the gradient at every step's projection output."""
        z = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        handle = z.expand(N, T, P)
        key = (id(self.mod), "proj", k)
        self.taps.append(Tap(handle, handle.shape, weakref.ref(handle), handle._version, key,
                             False, 2, True))
        return handle


def _weights(mod: nn.RNNBase, layer: int, reverse: bool) -> dict:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    return {role: getattr(mod, role + sfx, None) for role in _ROLES}


def _initial(mod: nn.RNNBase, x: torch.Tensor, hx) -> tuple | None:
    """``(h0, c0)`` ``(D * L, N, *)`` (``c0`` ``None`` but for an LSTM), zeros when ``hx`` is
    ``None``; ``None`` when ``hx`` is not shaped as torch's forward wants it (which then
    raises its own error)."""
    D = 2 if mod.bidirectional else 1
    N, H = x.shape[1], mod.hidden_size
    Hout = mod.proj_size or H
    lstm = mod.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(D * mod.num_layers, N, Hout)
        return h0, (x.new_zeros(D * mod.num_layers, N, H) if lstm else None)
    h0, c0 = hx if lstm and isinstance(hx, tuple) and len(hx) == 2 else (hx, None)
    if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (D * mod.num_layers, N, Hout):
        return None
    if lstm and (not isinstance(c0, torch.Tensor) or tuple(c0.shape) != (D * mod.num_layers, N, H)):
        return None
    return h0, c0


def _plain(mod: nn.RNNBase, cap: Capture, ps: list, x) -> bool:
    """Whether this call runs torch's own forward (see the module docstring)."""
    if isinstance(x, PackedSequence):
        if mod.dropout > 0 and mod.training and mod.num_layers > 1:
            return True  # torch draws its dropout on the packed data: a mask we cannot replay
        x = x.data.unsqueeze(0)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.is_nested:
        return True  # unbatched input
    if not torch.is_grad_enabled():
        return True
    if not recompute.replaying(cap) and (not cap.active or not ps):
        return True  # (a recomputation runs what its first forward ran: fimfast.recompute)
    w = mod.weight_ih_l0
    return x.dtype != w.dtype or x.device != w.device or x.shape[-1] != mod.input_size or (
        x.shape[0] == 0 or x.shape[1] == 0
    )


def _rnn_forward(rule: RecurrentRule, mod: nn.RNNBase, cap: Capture, input, hx=None):
    """``nn.RNN/LSTM/GRU.forward`` as unrolled cells with tapped gate pre-activations."""
    ws = [getattr(mod, n) for n in mod._flat_weights_names]
    ps = trainable(cap, *ws)
    if _plain(mod, cap, ps, input):
        return type(mod).forward(mod, input, hx)
    masks = None
    if isinstance(input, PackedSequence):  # padded, in the batch's own order, and step masks
        x, lengths = pad_packed_sequence(input)
        steps = torch.arange(x.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)
        masks = steps.to(x.device).unsqueeze(-1).unbind(0)  # (N, 1) per step
    else:
        x = input.transpose(0, 1) if mod.batch_first else input  # (T, N, I)
    init = _initial(mod, x, hx)
    if init is None or (saved_tensor_hooks_active() and not recompute.follow(
            mod, cap, lambda c: partial(_rnn_forward, rule, mod, c))):
        return type(mod).forward(mod, input, hx)  # (hooks not a checkpoint's: generic path)
    h0, c0 = init
    rec = _Recorder(mod, cap, {id(p) for p in ps})
    rec.masks = masks
    D = 2 if mod.bidirectional else 1
    hn, cn = [], []
    for layer in range(mod.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            W = _weights(mod, layer, bool(d))
            rec.declare(k, W)
            y, h, c = _direction(rec, k, x, h0[k], None if c0 is None else c0[k], W, bool(d))
            outs.append(y)
            hn.append(h)
            cn.append(c)
        x = outs[0] if D == 1 else torch.cat(outs, -1)
        if mod.dropout > 0 and mod.training and layer < mod.num_layers - 1:
            x = F.dropout(x, mod.dropout, True)  # the draw of torch's forward: (T, N, D * H)
    cap.record(Call(mod, rule, rec.taps, rec.uses, rec.data))
    if masks is not None:
        out = _packed_like(input, x)
    else:
        out = x.transpose(0, 1) if mod.batch_first else x
    h_n = torch.stack(hn)
    if mod.mode == "LSTM":
        return out, (h_n, torch.stack(cn))
    return out, h_n


def _packed_like(packed: PackedSequence, y: torch.Tensor) -> PackedSequence:
    """The padded time-major output ``y`` ``(T, N, F)`` (the batch's own order) packed as the
    input ``packed`` is: the valid steps of the samples by decreasing length, step by step."""
    bs = packed.batch_sizes
    order = packed.sorted_indices
    order = torch.arange(y.shape[1]) if order is None else order.cpu()
    t = torch.repeat_interleave(torch.arange(bs.numel()), bs)
    n = torch.cat([order[: int(b)] for b in bs])
    data = y[t.to(y.device), n.to(y.device)]
    return PackedSequence(data, bs, packed.sorted_indices, packed.unsorted_indices)


# devices whose torch cells (torch.lstm_cell, ...) take a per-sample b_ih: their composite CPU
# implementation adds b_ih through addmm; the fused CUDA cells want a 1-D bias
CELL_DEVICES = ("cpu",)
_CELLS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell,
          "RNN_RELU": torch.rnn_relu_cell}


def _direction(rec: _Recorder, k: int, x, h, c, W: dict, reverse: bool):
    """One layer and direction over the time-major input ``x`` ``(T, N, I)``: ``(outputs
    (T, N, Hout), last h, last c)``, with the data its terms need kept in ``rec``.

    The steps run as one :mod:`fimfast.rules.recurrent_scan` node where it applies; otherwise
    each step is torch's own cell (``torch.lstm_cell``, ``torch.gru_cell``, ...) with an empty
    input and the tapped input projection of the step in place of ``b_ih``: the cell's input
    side is then ``addmm(gi_t, empty, empty)``, which is ``gi_t``, and a step costs one call.
    Off the devices of :data:`CELL_DEVICES`, and for an LSTM with ``proj_size``
    (``torch.lstm_cell`` has no projection), the steps run as primitive ops
    (:func:`_unrolled_steps`)."""
    mod = rec.mod
    T, N = x.shape[:2]
    gi = rec.gate_tap(_projection(x, W), k)
    # views taken once: one autograd edge into each parameter however many steps use it
    whh = W["weight_hh"].view_as(W["weight_hh"])
    bhh = None if W["bias_hh"] is None else W["bias_hh"].view_as(W["bias_hh"])
    hps = None
    if W["weight_hr"] is not None and id(W["weight_hr"]) in rec.tracked:
        hps = rec.time_tap(T, N, mod.proj_size, x, k).unbind(1)
    d: dict[str, Any] = {"gate": len(rec.taps) - (2 if hps is not None else 1),
                         "htap": len(rec.taps) - 1, "reverse": reverse,
                         "x": x.detach(), "h0": h.detach()}
    if recurrent_scan.applies(mod.mode, W["weight_hr"], rec.masks, x.device):
        ys, h, c = recurrent_scan.run(mod.mode, x, gi, h, c, W, whh, bhh, reverse)
        return _finish(rec, d, ys, gi, W, h, c)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    outs: list = [None] * T
    gis = gi.unbind(0)  # one unbind: a select per step would back-propagate T zero-filled copies
    if W["weight_hr"] is not None or x.device.type not in CELL_DEVICES:
        h, c, raws = _unrolled_steps(mod.mode, mod.hidden_size, steps, gis, h, c, whh, bhh,
                                     W["weight_hr"], hps, outs, rec.masks)
        if raws:
            d["hraw"] = torch.stack(raws[::-1] if reverse else raws)
    else:
        cell = _CELLS[mod.mode]
        e, we = x.new_empty(N, 0), x.new_empty(gi.shape[-1], 0)
        for t in steps:
            if c is None:
                hn, cn = cell(e, h, we, whh, gis[t], bhh), None
            else:
                hn, cn = cell(e, (h, c), we, whh, gis[t], bhh)
            h, c = _keep(rec.masks, t, hn, h, cn, c)
            outs[t] = h
    return _finish(rec, d, torch.stack(outs), gi, W, h, c)


def _projection(x: torch.Tensor, W: dict) -> torch.Tensor:
    """``W_ih x_t + b_ih`` of every step, ``(T, N, G)``: for a batch-first input (``x`` the
    transposed view of a contiguous one) one product with the bias added in it, of the input as
    it is, returned as a transposed view (the tap takes it batch first; the ``cpp`` forward reads
    it as it is), where the product of the time-major view would copy ``x`` and add the bias
    apart."""
    xb = x.transpose(0, 1)
    if not x.is_contiguous() and xb.is_contiguous():
        return F.linear(xb, W["weight_ih"], W["bias_ih"]).transpose(0, 1)
    return F.linear(x, W["weight_ih"], W["bias_ih"])


def _finish(rec: _Recorder, d: dict, ys, gi, W: dict, h, c):
    """Keep the data of one layer and direction (outputs ``ys`` ``(T, N, Hout)``) in ``rec``;
    return ``(a copy of ys, last h, last c)``: the forward may write into the outputs it gets
    (``out.add_(...)``, as torch's layer allows), which must not reach the states kept."""
    mod = rec.mod
    d["hs"] = ys.detach()
    if mod.mode == "GRU":
        d["r"] = _reset_gates(gi, d, W, mod.hidden_size)
    rec.data["dirs"].append(d)
    return ys.clone(), h, c


def _keep(masks, t: int, hn, h, cn, c):
    """The state after step ``t``: the new one, or for the samples already ended (``masks``, a
    packed input) the one they had."""
    if masks is None:
        return hn, cn
    m = masks[t]
    return torch.where(m, hn, h), (None if c is None else torch.where(m, cn, c))


def _unrolled_steps(mode: str, H: int, steps, gis, h, c, whh, bhh, whr, hps, outs: list,
                    masks=None):
    """The steps as primitive ops: ``(last h, last c, unprojected h of every step in the order
    run)`` (the last only for an LSTM with ``proj_size``); ``hps``: the projection taps of every
    step (``None``: no tap); ``masks``: see :func:`_keep`."""
    whh_t = whh.t()
    whr_t = None if whr is None else whr.t()
    raws = []
    for t in steps:
        gh = h.mm(whh_t) if bhh is None else torch.addmm(bhh, h, whh_t)
        git, cn = gis[t], None
        if mode == "GRU":
            r, z = torch.sigmoid(git[:, : 2 * H] + gh[:, : 2 * H]).chunk(2, 1)
            n = torch.tanh(torch.addcmul(git[:, 2 * H :], r, gh[:, 2 * H :]))
            hn = torch.addcmul(n, z, h - n)
        elif mode == "LSTM":
            g = git + gh
            i, f, _, o = torch.sigmoid(g).chunk(4, 1)
            cn = torch.addcmul(f * c, i, torch.tanh(g[:, 2 * H : 3 * H]))
            hn = o * torch.tanh(cn)
            if whr_t is not None:
                raws.append(hn.detach())
                hn = hn.mm(whr_t) if hps is None else torch.addmm(hps[t], hn, whr_t)
        else:
            hn = torch.relu(git + gh) if mode == "RNN_RELU" else torch.tanh(git + gh)
        h, c = _keep(masks, t, hn, h, cn, c)
        outs[t] = h
    return h, c, raws


def _reset_gates(gi: torch.Tensor, d: dict, W: dict, H: int) -> torch.Tensor:
    """The GRU's reset gates ``r_t`` ``(T, N, H)`` of every step, recomputed at once from the
    gate inputs and the hidden states each step started from (the cell does not return them)."""
    with torch.no_grad():
        b = W["bias_hh"]
        pre = F.linear(_hprev(d), W["weight_hh"][:H], None if b is None else b[:H])
        return torch.sigmoid(pre + gi.detach()[..., :H])
