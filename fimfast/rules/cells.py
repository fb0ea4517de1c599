"""Rules for ``nn.RNNCell``, ``nn.LSTMCell`` and ``nn.GRUCell``: one step, with tapped gate
inputs, for models that loop a cell over time (decoders, attention decoders, hand-written
recurrences).

A cell call computes its gates from two linear maps, ``gi = W_ih x + b_ih`` and
``gh = W_hh h + b_hh``, so the per-sample gradients of its parameters are those of two linear
layers: ``Outer(G_i, x)`` for ``W_ih``, ``Outer(G_h, h)`` for ``W_hh``, ``G_i`` and ``G_h`` for
the biases, with ``G_i`` the gradient at ``gi`` and ``G_h`` the one at ``gh`` (docs/math.md §4,
"Recurrent layers"). ``gh`` enters the gates as ``gi + gh`` (RNN, LSTM, and the GRU's reset and
update gates), so ``G_h = G_i`` there; the GRU's candidate gate takes ``r * gh_n``, so its part of
``G_h`` is ``G_i``'s times the reset gate ``r`` (kept by the forward's node where it ran one,
else recomputed once per call from the kept ``x`` and ``h``). A cell called ``T`` times per step
records ``T`` calls: the engine adds a parameter's terms over them before the square (the steps
are positions of one ``Outer``).

During a capture the cell's forward is :func:`_cell_forward`: ``gi`` is computed as torch's cell
computes it (``F.linear(x, W_ih, b_ih)``), tapped, and handed to torch's own cell function
(``torch.gru_cell``, ...) in place of ``b_ih``, with an empty input: the cell's input side is then
``addmm(gi, empty, empty)``, which is ``gi``, and the output is torch's bit for bit on the CPU
(the same trick as :func:`fimfast.rules.recurrent._direction`). After a step whose backward
batched several columns (EXACT), a GRU, LSTM or tanh cell runs instead as one autograd node of
:mod:`fimfast.rules.cell_steps` (torch's ops in torch's order: the same output bit for bit, a
backward that batches; the GRU's node keeps its reset gate). Off the CPU (torch's fused cells
want a 1-D bias) the step runs as primitive ops (:func:`fimfast.rules.recurrent._unrolled_steps`),
equal to torch's cell to rounding.

An unbatched call (a 1-D input), a state not shaped ``(N, hidden_size)``, an input of another
dtype or device than the weights, or a call under autocast runs torch's own forward: the cell's
parameters then take the generic path (exact). So does a cell whose parameters are also used
outside its calls (the engine counts their autograd edges).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fimfast import recompute
from fimfast.hooks import Call, Capture, Use, saved_tensor_hooks_active
from fimfast.rules.base import Outer, Rule, Term, UseKind, Vec, front, patch_forward, trainable
from fimfast.rules.cell_steps import cell_step
from fimfast.rules.recurrent import CELL_DEVICES, _unrolled_steps

_ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_CELLS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell,
          "RNN_RELU": torch.rnn_relu_cell}


def cell_mode(module: nn.Module) -> str | None:
    """The recurrence of a cell module (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``),
    or ``None`` for a module this rule does not know."""
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    if isinstance(module, nn.RNNCell):
        return {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(module.nonlinearity)
    return None


class CellRule(Rule):
    """``nn.RNNCell``, ``nn.LSTMCell`` and ``nn.GRUCell``: their forward runs as
    :func:`_cell_forward` during a capture (see the module docstring)."""

    name = "cell"
    takes_functions = True  # its terms tell uses apart by role

    def accepts(self, module):
        return cell_mode(module) is not None

    def install(self, module, cap):
        return patch_forward(module, partial(_cell_forward, self, module, cap))

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        d, tap = call.data, call.taps[0]
        P = front(G, tap.bdim, tap.lead, extra=1)  # (M, N, 1, gates * H)
        Ph = P
        if d["mode"] == "GRU":
            H = P.shape[-1] // 3
            Ph = torch.cat([P[..., : 2 * H], P[..., 2 * H :] * _reset_gate(d, H)], dim=-1)
        out: list[Term | None] = []
        for role in d["roles"]:
            if role == "weight_ih":
                out.append(Outer(P, d["x"].unsqueeze(1)))
            elif role == "weight_hh":
                out.append(Outer(Ph, d["h"].unsqueeze(1)))
            else:
                out.append(Vec((P if role == "bias_ih" else Ph)[:, :, 0]))
        return out


def _reset_gate(d: dict, H: int) -> torch.Tensor:
    """The GRU's reset gate ``r = sigmoid(gi_r + W_hr h + b_hr)`` ``(N, 1, H)`` of the call,
    formed once per call (the cell does not return it)."""
    if "r" not in d:
        if d.get("r_fwd") is not None:  # kept by the forward (fimfast.rules.cell_steps)
            d["r"] = d["r_fwd"].unsqueeze(1)
            return d["r"]
        with torch.no_grad():
            w, b = d["w_hh"], d["b_hh"]
            pre = F.linear(d["h"], w[:H], None if b is None else b[:H])
            d["r"] = torch.sigmoid(pre + d["gi"][:, :H]).unsqueeze(1)
    return d["r"]


def _state(mod: nn.Module, mode: str, x: torch.Tensor, hx) -> tuple | None:
    """``(h, c)`` (``c`` ``None`` but for an LSTM), zeros where ``hx`` is ``None``; ``None`` when
    ``hx`` is not shaped ``(N, hidden_size)`` as torch's cell wants it (its forward then runs,
    and raises its own error or handles the shape)."""
    shape = (x.shape[0], mod.hidden_size)
    if hx is None:
        z = x.new_zeros(shape)
        return z, (x.new_zeros(shape) if mode == "LSTM" else None)
    if mode == "LSTM":
        if not (isinstance(hx, tuple | list) and len(hx) == 2):
            return None
        h, c = hx
    else:
        h, c = hx, None
    for s in (h, c) if mode == "LSTM" else (h,):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape or s.dtype != x.dtype or (
                s.device != x.device):
            return None
    return h, c


def _plain(mod: nn.Module, cap: Capture, ps: list, x) -> bool:
    """Whether this call runs torch's own forward (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_nested or x.shape[0] == 0:
        return True  # an unbatched (1-D) input, or no batch at all
    if not torch.is_grad_enabled():
        return True
    if not recompute.replaying(cap) and (not cap.active or not ps):
        return True  # (a recomputation runs what its first forward ran: fimfast.recompute)
    w = mod.weight_ih
    if torch.is_autocast_enabled(x.device.type):
        return True  # the cell's casts are autocast's: torch's forward keeps them
    return x.dtype != w.dtype or x.device != w.device or x.shape[1] != mod.input_size


def _cell_forward(rule: CellRule, mod: nn.Module, cap: Capture, input, hx=None):
    """``nn.RNNCell/LSTMCell/GRUCell.forward`` with the tapped input projection (module
    docstring); returns what torch's forward returns."""
    mode = cell_mode(mod)
    ws = [getattr(mod, r) for r in _ROLES]
    ps = trainable(cap, *ws)
    if mode is None or _plain(mod, cap, ps, input):
        return type(mod).forward(mod, input, hx)
    state = _state(mod, mode, input, hx)
    if state is None or (saved_tensor_hooks_active() and not recompute.follow(
            mod, cap, lambda c: partial(_cell_forward, rule, mod, c))):
        return type(mod).forward(mod, input, hx)  # (hooks not a checkpoint's: generic path)
    h, c = state
    w_ih, w_hh, b_ih, b_hh = ws
    taken = {id(q) for q in ps}
    roles = [r for r, p in zip(_ROLES, ws, strict=True) if id(p) in taken]

    def build() -> list[Use]:
        return [Use(p, UseKind.OUTER if r.startswith("weight") else UseKind.VEC)
                for r, p in zip(_ROLES, ws, strict=True) if id(p) in taken]

    uses, internal, key = cap.uses_of(mod, rule, tuple(ws), build)
    gi = F.linear(input, w_ih, b_ih)
    tap, gt = cap.tap(gi, lead=1, key=(id(mod), "gates"), batch_first=True)
    data = {"mode": mode, "roles": roles, "x": input.detach(), "h": h.detach(),
            "gi": gi.detach(), "w_hh": w_hh.detach(),
            "b_hh": None if b_hh is None else b_hh.detach()}
    if input.device.type in CELL_DEVICES:
        out = cell_step(mode, _CELLS[mode], gt, h, c, w_hh, b_hh, getattr(cap, "columns", 1),
                        data)
    else:
        outs: list = [None]
        hn, cn, _ = _unrolled_steps(mode, mod.hidden_size, range(1), [gt], h, c, w_hh, b_hh,
                                    None, None, outs)
        out = hn if cn is None else (hn, cn)
    cap.record(Call(mod, rule, [tap], uses, data), internal, key)
    return out

