"""Direct cell calls on parameters for :class:`fimfast.functional.FunctionalMode`:
``torch.gru_cell``, ``torch.lstm_cell``, ``torch.rnn_tanh_cell`` and ``torch.rnn_relu_cell``
(a hand-written recurrence calling them, a cell subclass with its own forward).

The call is recorded as :class:`fimfast.rules.cells.CellRule` records a cell module's call (the
same terms, docs/math.md §4 "Recurrent layers"): the input projection ``gi = F.linear(x, W_ih,
b_ih)`` is computed here, tapped, and handed to torch's own cell function in place of ``b_ih``
with an empty input (``addmm(gi, empty, empty)`` is ``gi``), so the output is torch's bit for bit
on the CPU; elsewhere the step runs as primitive ops
(:func:`fimfast.rules.recurrent._unrolled_steps`), equal to torch's cell to rounding. Each of
``W_ih``, ``W_hh``, ``b_ih``, ``b_hh`` may be a parameter, an elementwise function of one in its
shape (``W * mask``: the use carries its ``chain``) or any other tensor (not recorded).

Left to torch's own call (its parameters then take the generic path, exact): an unbatched
(1-D) or empty input, a state not shaped ``(N, hidden)``, weights of other shapes, dtypes or
devices than the input, and calls under autocast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fimfast.functional_derived import _bind
from fimfast.hooks import Use
from fimfast.rules.base import UseKind
from fimfast.rules.cell_steps import cell_step
from fimfast.rules.cells import _ROLES, CellRule
from fimfast.rules.recurrent import CELL_DEVICES, _unrolled_steps

F = torch.nn.functional
Tensor = torch.Tensor

_MODES = {torch.gru_cell: ("GRU", 3), torch.lstm_cell: ("LSTM", 4),
          torch.rnn_tanh_cell: ("RNN_TANH", 1), torch.rnn_relu_cell: ("RNN_RELU", 1)}
_ARGS = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")
CELL = CellRule()  # its terms read only call.data and the tap


def _operands(mode, ws: list) -> tuple[list, list[Use], list[str]]:
    """The cell's weights with those made from a parameter (the parameter, or an elementwise
    function of it in its shape) made again, their uses and roles, in the order of ``_ROLES``."""
    vals, uses, roles = list(ws), [], []
    for k, (role, w) in enumerate(zip(_ROLES, ws, strict=True)):
        found = mode.operand(w) if isinstance(w, Tensor) else None
        if found is None or tuple(found[0].shape) != tuple(w.shape):
            continue
        p, remake, chain = found
        vals[k] = remake() if remake is not None else p
        kind = UseKind.OUTER if role.startswith("weight") else UseKind.VEC
        uses.append(Use(p, kind, chain=chain))
        roles.append(role)
    return vals, uses, roles


def _fits(x, state: tuple, ws: list, gates: int) -> bool:
    """Whether the call is a batched step the rule records (see the module docstring)."""
    w_ih, w_hh, b_ih, b_hh = ws
    if not (isinstance(x, Tensor) and isinstance(w_ih, Tensor) and isinstance(w_hh, Tensor)):
        return False
    if x.dim() != 2 or x.is_nested or x.shape[0] == 0 or w_ih.dim() != 2 or w_hh.dim() != 2:
        return False
    H = w_hh.shape[1]
    if w_ih.shape != (gates * H, x.shape[1]) or w_hh.shape[0] != gates * H:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False  # autocast's casts: torch's call keeps them
    for t in (w_ih, w_hh, b_ih, b_hh, *state):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != x.dtype
                              or t.device != x.device):
            return False
    return all(s.shape == (x.shape[0], H) for s in state) and all(
        b is None or b.shape == (gates * H,) for b in (b_ih, b_hh))


def _cell(mode, func, args, kwargs):
    b = _bind(args, kwargs, _ARGS, (None,) * 4 + (None, None))
    if b is None:
        return func(*args, **kwargs)
    name, gates = _MODES[func]
    x, hx = b[0], b[1]
    state = tuple(hx) if name == "LSTM" and isinstance(hx, tuple | list) else (hx,)
    if len(state) != (2 if name == "LSTM" else 1) or not _fits(x, state, b[2:], gates):
        return func(*args, **kwargs)
    ws, uses, roles = _operands(mode, b[2:])
    if not uses:
        return func(*args, **kwargs)
    w_ih, w_hh, b_ih, b_hh = ws
    gi = F.linear(x, w_ih, b_ih)
    data = {"mode": name, "roles": roles, "x": x.detach(), "h": state[0].detach(),
            "gi": gi.detach(), "w_hh": w_hh.detach(),
            "b_hh": None if b_hh is None else b_hh.detach()}
    gt = mode.record(f"torch.{func.__name__}", CELL, gi, 1, uses, data, batch_first=True)
    c = state[1] if name == "LSTM" else None
    if x.device.type in CELL_DEVICES:
        return cell_step(name, func, gt, state[0], c, w_hh, b_hh,
                         getattr(mode.cap, "columns", 1), data)
    outs: list = [None]
    hn, cn, _ = _unrolled_steps(name, w_hh.shape[1], range(1), [gt], state[0], c, w_hh, b_hh,
                                None, None, outs)
    return hn if cn is None else (hn, cn)


HANDLERS: dict[Callable, Callable] = dict.fromkeys(_MODES, _cell)
"""Handlers of the cell functions (merged into :mod:`fimfast.functional`'s)."""
