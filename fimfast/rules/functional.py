"""Rules for parameters used by functional calls: ``F.linear``, ``x @ W``, ``F.embedding``,
``F.conv1d``/``F.conv2d`` and elementwise ``x * p``, ``x / p``, ``x + p``, ``x - p``.

These calls are recorded by :mod:`fimfast.functional` (a ``TorchFunctionMode`` active during the
captured forward), not by module hooks: a :class:`Call` of one of them has a :class:`Site` in
place of a module, and keeps in ``call.data`` everything its terms need (the input, the call's
configuration). The terms are those of the module rules (docs/math.md §4): an ``F.linear`` or a
``matmul`` is a linear map (:class:`Outer` + :class:`Vec`), an ``F.embedding`` a table
(:class:`Rows`), a convolution an :class:`Outer` over output positions. An elementwise use of
a parameter ``p`` broadcast over the batch, ``y = f(x, p)``, has the per-sample gradient
``sum_{e in sample n} G[e] * dy[e]/dp``, summed down to ``p``'s shape (a :class:`Vec`): the
derivative is ``x`` for ``x * p``, ``-x / p^2`` for ``x / p``, ``1 / x`` for ``p / x`` and
``+-1`` for a sum or difference.
"""

from __future__ import annotations

import torch

from fimfast.rules.base import Outer, Rows, Rule, Term, UseKind, Vec, _linear_terms, front
from fimfast.rules.conv import _unfold


class Site:
    """One functional call site of the forward, the same object in every step.

    A site stands where a module rule's call has its module (``Call.module``): the engine keys
    its plans, its probe verdicts and its direct taps by it. Sites are told apart by their kind,
    the parameters they use and their order among the calls of that kind and parameters in one
    forward (see :class:`fimfast.functional.FunctionalMode`).

    Attributes:
        name: ``"F.linear"``, ``"matmul"``, ``"F.embedding"``, ``"F.conv2d"``, ``"mul"``, ...
        training: the model's mode when the call was last recorded.
    """

    __slots__ = ("__weakref__", "name", "training")

    def __init__(self, name: str) -> None:
        self.name = name
        self.training = True

    def __repr__(self) -> str:
        return f"Site({self.name!r})"


class FunctionalLinearRule(Rule):
    """``F.linear(x, W, b)``, and ``x @ W`` / ``x @ W.t()`` (a ``transposed`` use for a weight
    stored ``(I, O)``): ``W`` gets ``Outer(G, x)``, ``b`` gets ``sum_t G``. Its input is
    ``call.data["x"]``, so as the logits layer it takes the closed form of
    :class:`~fimfast.rules.LinearRule`."""

    name = "F.linear"
    closed_form_head = True

    def terms(self, call, grads):
        return _linear_terms(call, grads[0], call.taps[0], call.data, "x", call.uses)


class FunctionalEmbeddingRule(Rule):
    """``F.embedding(ids, W, padding_idx)``: per-sample segment sums of the output gradients by
    id; ``padding_idx`` tokens do not count (``call.data["padding_idx"]``)."""

    name = "F.embedding"

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None]
        tap = call.taps[0]
        if "front" not in call.data:
            ids = front(call.data["ids"], tap.bdim, tap.lead)  # (N, S)
            pi = call.data["padding_idx"]
            call.data["front"] = (ids.long(), None if pi is None else ids != pi)
        ids, keep = call.data["front"]
        return [Rows(ids, keep, front(G, tap.bdim, tap.lead, extra=1))]


class FunctionalConvRule(Rule):
    """``F.conv1d``/``F.conv2d`` (batched input; stride, dilation, groups, integer, tuple,
    ``"same"`` or ``"valid"`` padding): the zero-padded input unfolded into patches, ``Outer``
    over output positions (one block per group) for the weight, ``sum`` over positions for the
    bias, as :class:`~fimfast.rules.ConvRule`."""

    name = "F.conv"

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        d = call.data
        if "Q" not in d:
            d["Q"] = _patches(d["x"], d["kernel"], d["stride"], d["padding"], d["dilation"],
                              d["groups"])
        Q = d["Q"]
        M, N, O = G.shape[:3]
        g = d["groups"]
        G3 = G.reshape(M, N, O, -1)
        out: list[Term | None] = []
        for u in call.uses:
            if u.kind == UseKind.VEC:
                out.append(Vec(G3.sum(-1)))
            else:
                P = G3.transpose(2, 3)  # (M, N, L, O)
                if g == 1:
                    out.append(Outer(P, Q[:, :, 0]))
                else:
                    out.append(Outer(P.reshape(M, N, P.shape[2], g, O // g), Q))
        return out


def conv_padding(padding, kernel, dilation) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding of each spatial dim of a functional convolution, as torch
    pads it: an int or tuple on both sides, ``"valid"`` none, ``"same"`` ``d (k - 1)`` in all
    with the odd one after."""
    n = len(kernel)
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    pads = (padding,) * n if isinstance(padding, int) else tuple(padding)
    return [(p, p) for p in pads]


def _patches(x, kernel, stride, padding, dilation, groups) -> torch.Tensor:
    """``(N, L, g, I/g * prod(kernel))`` unfolded input patches of a functional convolution."""
    flat = [v for pair in reversed(padding) for v in pair]  # F.pad: last dim first
    if any(flat):
        x = torch.nn.functional.pad(x, flat)
    k, d, s = tuple(kernel), tuple(dilation), tuple(stride)
    if x.dim() == 3:  # conv1d as a 2-D convolution of height 1
        x, k, d, s = x.unsqueeze(2), (1, k[0]), (1, d[0]), (1, s[0])
    U = _unfold(x, k, d, s)  # (N, I*kk, L)
    N, IK, L = U.shape
    return U.view(N, groups, IK // groups, L).permute(0, 3, 1, 2)


class ElementwiseRule(Rule):
    """``x * p``, ``x / p``, ``p / x``, ``x + p``, ``x - p``, ``p - x`` with ``p`` a parameter (or a
    reshaped view of one): ``Vec(sum G * dy/dp)`` per sample, summed over the sample's elements
    down to ``p``'s shape (the module docstring). Any dim of the output may be the batch (the
    probe decides); where ``p`` is not broadcast along it (a ``(N, d)`` table of per-slot
    values), sample ``n``'s gradient is its slice ``n``. ``call.data``: ``deriv``
    (``dy/dp``, detached, broadcastable to ``y``; ``None`` for a sum), ``sign`` (``-1`` for
    ``x - p``) and ``shape`` (the shape ``p`` had in the call)."""

    name = "elementwise"

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None]
        tap, d = call.taps[0], call.data
        D = G if d["deriv"] is None else G * d["deriv"]
        if d["sign"] < 0:
            D = -D
        b = tap.bdim
        D = D.movedim(b + 1, 1)  # (M, N, rest of y)
        M, N = D.shape[:2]
        shape = tuple(d["shape"])
        full = (1,) * (len(tap.shape) - len(shape)) + shape  # p aligned to y
        rest = full[:b] + full[b + 1 :]
        dims = [2 + i for i, s in enumerate(rest) if s == 1 and D.shape[2 + i] != 1]
        V = D.sum(dims, keepdim=True) if dims else D  # (M, N, *rest)
        p = call.uses[0].param
        if full[b] != 1:
            # p runs along the batch dim too (size N): sample n's gradient is its slice n
            E = V.new_zeros(M, N, *full)
            n = torch.arange(N, device=V.device)
            E.movedim(b + 2, 2)[:, n, n] = V
            V = E
        return [Vec(V.reshape(M, N, *p.shape))]


LINEAR = FunctionalLinearRule()
EMBEDDING = FunctionalEmbeddingRule()
CONV = FunctionalConvRule()
ELEMENTWISE = ElementwiseRule()
