"""One captured step of a recurrent cell on the CPU, with a backward written for many columns.

A captured cell call (:mod:`fimfast.rules.cells`, :mod:`fimfast.functional_cells`) hands its
tapped input projection ``gi`` to the cell. Torch's CPU cells are composite: their backward is
some twenty autograd nodes per step, and in the engine's batched backward of several columns
(:func:`fimfast.persample.stream.batched_grads`) some of them (``tanh_backward``) have no
batching rule and run column by column, their results stacked. Here the step is one autograd
node (:class:`_GRU`, :class:`_LSTM`, :class:`_Tanh`) after the hidden projection
``gh = F.linear(h, W_hh, b_hh)`` (an ordinary node: the weights' gradients, where wanted, are
its own): its forward runs the ops of torch's cell in torch's order (the output equal bit for
bit, tests/test_cell_steps.py), its backward forms the gate gradients of all columns by two
broadcast products with coefficients formed once per step from the saved gates (docs/math.md
§4, "Recurrent layers"):

* GRU (``r``, ``z``, ``n`` the reset, update and candidate gates, ``h' = (h - n) z + n``):
  ``a = (1 - z)(1 - n^2)``, the gradient at ``gi`` is ``dh' [a r (1 - r) gh_n, (h - n) z (1 - z),
  a]`` and at ``gh`` the same with ``a r`` in the candidate rows; ``h`` gets ``dh' z`` (plus the
  hidden projection's backward);
* LSTM (``i``, ``f``, ``g``, ``o``, ``c' = f c + i g``, ``h' = o tanh(c')``): ``dc = dc' + dh' o
  (1 - tanh(c')^2)``, the gate gradient ``[dc g i (1 - i), dc c f (1 - f), dc i (1 - g^2),
  dh' tanh(c') o (1 - o)]`` at ``gi`` and ``gh`` alike, ``c`` gets ``dc f``;
* RNN (tanh): ``dh' (1 - h'^2)`` at ``gi`` and ``gh``.

The backward is not differentiable again (``once_differentiable``: a double backward through a
captured cell raises). ReLU cells keep torch's cell (their backward batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _GRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh, h, keep):
        H = h.shape[-1]
        gir, giz, gin = gi.chunk(3, 1)  # (Tensor.split is a Python wrapper)
        ghn = gh[:, 2 * H :]
        wr, wz, wn = gh.clone().chunk(3, 1)  # torch's ops on strided views, in place
        r = wr.add_(gir).sigmoid_()
        z = wz.add_(giz).sigmoid_()
        n = gin.add(wn.mul_(r)).tanh_()
        hmn = h - n
        ctx.save_for_backward(r, z, n, ghn, hmn)
        if keep is not None:
            keep["r_fwd"] = r
        return hmn.mul(z).add_(n)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        r, z, n, ghn, hmn = ctx.saved_tensors
        a = (1 - z) * (1 - n * n)
        cr = a * ghn * (r * (1 - r))
        cz = hmn * (z * (1 - z))
        ci = torch.stack([cr, cz, a], -2)
        ch = torch.stack([cr, cz, a * r], -2)
        d = dh.unsqueeze(-2)
        n = dh.shape[0]  # view: flatten has no batching rule in a batched backward
        return (d * ci).view(n, -1), (d * ch).view(n, -1), dh * z, None


class _LSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh, c):
        gates = gh + gi
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
        cy = (f * c).add_(i * g)
        tc = cy.tanh()
        ctx.save_for_backward(i, f, g, o, tc, c)
        return o * tc, cy

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dc):
        i, f, g, o, tc, c = ctx.saved_tensors
        dc = dc + dh * (o * (1 - tc * tc))
        coef = torch.stack([g * (i * (1 - i)), c * (f * (1 - f)), i * (1 - g * g)], -2)
        do = (dh * (tc * (o * (1 - o)))).unsqueeze(-2)
        dg = torch.cat([dc.unsqueeze(-2) * coef, do], -2).view(dh.shape[0], -1)
        return dg, dg, dc * f


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh):
        hy = (gh + gi).tanh_()
        ctx.save_for_backward(hy)
        return hy

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        (hy,) = ctx.saved_tensors
        dg = dh * (1 - hy * hy)
        return dg, dg


def cell_step(mode: str, func, gt: torch.Tensor, h: torch.Tensor, c, w_hh: torch.Tensor,
              b_hh, columns: int = 2, keep: dict | None = None):
    """One step of the cell ``mode`` from its tapped input projection ``gt`` and state ``h``
    (``c``: an LSTM's cell state), what torch's cell ``func`` returns for it (module
    docstring); ``func`` itself (the input side an empty product equal to ``gt``) for a ReLU
    cell and for a backward of one column (``columns``, those of the engine's last step: there
    torch's nodes cost less, 2.5 against 3.5 ms for the 16 steps of a ``GRUCell(32, 128)`` on
    64 sequences, 1 thread). ``keep``: where the GRU's node keeps its reset gate (``"r_fwd"``,
    ``(N, H)``, detached: the squares of ``W_hh`` read it, :mod:`fimfast.persample.cell_lane`)."""
    if mode == "RNN_RELU" or columns <= 1:
        return func(_empty(gt, gt.shape[0]), h if c is None else (h, c), _empty(gt, gt.shape[-1]),
                    w_hh, gt, b_hh)
    gh = F.linear(h, w_hh, b_hh)
    if mode == "GRU":
        return _GRU.apply(gt, gh, h, keep)
    if mode == "LSTM":
        return _LSTM.apply(gt, gh, c)
    return _Tanh.apply(gt, gh)


def _empty(x: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty ``(rows, 0)`` tensor of ``x``'s dtype and device, made once (it holds no data:
    every call may share it)."""
    key = (rows, x.dtype, x.device)
    t = _EMPTIES.get(key)
    if t is None:
        if len(_EMPTIES) > 64:
            _EMPTIES.clear()
        t = _EMPTIES[key] = x.new_empty(rows, 0)
    return t


_EMPTIES: dict = {}
