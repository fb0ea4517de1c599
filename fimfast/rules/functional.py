"""Rules for parameters used by functional calls: ``F.linear``, ``x @ W`` and ``W @ x``,
``F.embedding``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``, the functional norms,
contractions (``einsum``, ``bmm``, ``baddbmm``, ``addmm``) and elementwise ``x * p``, ``x / p``,
``x + p``, ``x - p``.

These calls are recorded by :mod:`fimfast.functional` and :mod:`fimfast.functional_ops` (a
``TorchFunctionMode`` active during the captured forward), not by module hooks: a :class:`Call`
of one of them has a :class:`Site` in place of a module, and keeps in ``call.data`` everything its
terms need (the input, the call's configuration). The terms are those of the module rules
(docs/math.md §4): an ``F.linear`` or a ``matmul`` is a linear map (:class:`Outer` +
:class:`Vec`), an ``F.embedding`` a table (:class:`Rows`), a convolution an :class:`Outer` over
output positions (input positions for a transposed one), a norm's affine a :class:`Vec`. An
elementwise use of a parameter ``p`` broadcast over the batch, ``y = f(x, p)``, has the
per-sample gradient ``sum_{e in sample n} G[e] * dy[e]/dp``, summed down to ``p``'s shape (a
:class:`Vec`): the derivative is ``x`` for ``x * p``, ``-x / p^2`` for ``x / p``, ``1 / x`` for
``p / x`` and ``+-1`` for a sum or difference. A contraction's operand gets the contraction of
the output gradient with the other operands (a :class:`Vec`). A ``Vec`` use of ``s = f(p)``, an
elementwise function of ``p``, is multiplied by ``ds/dp`` (``call.data``'s ``chain``:
:func:`chained`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fimfast.dtypes import compute_dtype
from fimfast.rules.base import Outer, Rule, Term, UseKind, Vec, _linear_terms, front
from fimfast.rules.conv import _conv_terms, _unfold, _unfold_output_grad, input_side
from fimfast.rules.embedding import EmbeddingBagRule, lookup_terms


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
    takes_functions = True  # its terms tell uses apart by kind

    def terms(self, call, grads):
        return _linear_terms(call, grads[0], call.taps[0], call.data, "x", call.uses)


class FunctionalEmbeddingRule(Rule):
    """``F.embedding(ids, W, padding_idx)``: per-sample segment sums of the output gradients by
    id; ``padding_idx`` tokens do not count (``call.data["padding_idx"]``)."""

    name = "F.embedding"

    def terms(self, call, grads):
        return lookup_terms(call, grads, call.data["padding_idx"])


class FunctionalConvRule(Rule):
    """``F.conv1d``/``F.conv2d`` (batched input; stride, dilation, groups, integer, tuple,
    ``"same"`` or ``"valid"`` padding): the zero-padded input unfolded into patches, ``Outer``
    over output positions (one block per group) for the weight, ``sum`` over positions for the
    bias, as :class:`~fimfast.rules.ConvRule`."""

    name = "F.conv"
    takes_functions = True  # its terms tell uses apart by kind

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        d = call.data
        M, N, O = G.shape[:3]
        g = d["groups"]
        if "Q" not in d:  # by pieces, as ConvRule (fimfast/rules/conv.py, input_side)
            x = d["x"]
            IK = x.shape[1] * math.prod(d["kernel"])
            of = functools.partial(_patches, kernel=d["kernel"], stride=d["stride"],
                                   padding=d["padding"], dilation=d["dilation"], groups=g)
            d["Q"] = input_side(of, x, IK, math.prod(G.shape[3:]), g, call.chunks)
        Q = d["Q"]
        G3 = G.reshape(M, N, O, -1)
        out: list[Term | None] = []
        for u in call.uses:
            if u.kind == UseKind.VEC:
                out.append(Vec(G3.sum(-1)))
            else:
                P = G3.transpose(2, 3)  # (M, N, L, O)
                if g == 1:
                    out.append(Outer(P, Q if Q.dim() == 3 else Q[:, :, 0]))
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
    takes_functions = True  # one use; its parameter is read for ``chained`` only

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None]
        tap, d = call.taps[0], call.data
        D = G if d["deriv"] is None else G * d["deriv"]
        if d["sign"] < 0:
            D = -D
        V = broadcast_grad(D, tap.bdim, len(tap.shape), tuple(d["shape"]))
        return [Vec(chained(V, call.uses[0].param, d.get("chain")))]


def broadcast_grad(D: torch.Tensor, b: int, ndim: int, shape: tuple) -> torch.Tensor:
    """Per-sample gradient ``(M, N, *shape)`` of a tensor of ``shape`` broadcast into an output
    of ``ndim`` dims whose batch dim is ``b``, from ``D`` ``(M, *output)``: the gradient times the
    derivative at every output element, summed over the sample's elements down to ``shape``.
    Where the tensor runs along the batch dim too (a ``(N, d)`` table of per-slot values), sample
    ``n``'s gradient is its slice ``n``."""
    D = D.movedim(b + 1, 1)  # (M, N, rest of y)
    M, N = D.shape[:2]
    full = (1,) * (ndim - len(shape)) + tuple(shape)  # aligned to y
    rest = full[:b] + full[b + 1 :]
    dims = [2 + i for i, s in enumerate(rest) if s == 1 and D.shape[2 + i] != 1]
    V = D.sum(dims, keepdim=True) if dims else D  # (M, N, *rest)
    if full[b] != 1:
        E = V.new_zeros(M, N, *full)
        n = torch.arange(N, device=V.device)
        E.movedim(b + 2, 2)[:, n, n] = V
        return E.reshape(M, N, *shape)
    return V.reshape(M, N, *shape)


def chained(V: torch.Tensor, p: torch.Tensor, chain: torch.Tensor | None) -> torch.Tensor:
    """``(M, N, *p.shape)`` per-sample gradient of ``p`` from ``V``, that of a tensor made from
    ``p`` element by element (a view: ``chain`` ``None``; ``exp(p)``: ``chain = exp(p)``)."""
    V = V.reshape(*V.shape[:2], *p.shape)
    return V if chain is None else V * chain.to(V.dtype)


class FunctionalNormRule(Rule):
    """``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``: ``weight`` gets ``sum_t G * xhat``,
    ``bias`` ``sum_t G`` per sample (as :mod:`fimfast.rules.norm`), ``xhat`` the normalised input
    from torch's own kernel without the affine. ``call.data``: ``x``, ``fn``, ``eps``, ``shape``
    or ``groups``, ``roles`` (2: weight, 3: bias) and ``chains`` of the uses."""

    name = "F.norm"

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        d, tap = call.data, call.taps[0]
        dt = compute_dtype(G.dtype)
        if "xhat" not in d:
            x, fn, eps = d["x"].to(dt), d["fn"], d["eps"]
            if fn is F.group_norm:
                xh = F.group_norm(x, d["groups"], None, None, eps)
            elif fn is F.rms_norm:
                xh = F.rms_norm(x, d["shape"], None, eps)
            else:
                xh = F.layer_norm(x, d["shape"], None, None, eps)
            d["xhat"] = self._front(d, tap, xh)
        Gf = self._front(d, tap, G.to(dt), extra=1)  # (M, N, T, *affine)
        out: list[Term | None] = []
        for u, role, chain in zip(call.uses, d["roles"], d["chains"]):
            V = (Gf * d["xhat"]).sum(2) if role == 2 else Gf.sum(2)
            out.append(Vec(chained(V, u.param, chain)))
        return out

    @staticmethod
    def _front(d, tap, t, extra=0):
        if d["fn"] is F.group_norm:  # (*extra, N, C, *spatial) -> (*extra, N, L, C)
            s = t.shape
            return t.reshape(*s[: extra + 2], -1).transpose(-1, -2)
        return front(t, tap.bdim, tap.lead, extra)


class FunctionalConvTransposeRule(Rule):
    """``F.conv_transpose1d/2d/3d`` (batched input): the terms of
    :class:`~fimfast.rules.conv.ConvTransposeRule`, the configuration in ``call.data["cfg"]``."""

    name = "F.conv_transpose"

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        d = call.data
        cfg, x = d["cfg"], d["x"]
        N, I = x.shape[:2]
        g = cfg.groups
        if "Q" not in d:
            d["Q"] = x.reshape(N, g, I // g, -1).permute(0, 3, 1, 2)
        P = _unfold_output_grad(cfg, G, x.shape[2:])
        M, O = G.shape[0], G.shape[2]
        return _conv_terms(call, G.reshape(M, N, O, -1), P, d["Q"], g)


class ContractionRule(Rule):
    """``einsum`` / ``bmm`` / ``baddbmm`` / ``addmm`` with a parameter operand ``p`` (and/or a
    parameter added): the per-sample gradient of operand ``k`` is the contraction of the output
    gradient with the other operands onto ``k``'s subscripts, the batch letter kept
    (``einsum("Zy,x->Zbp")``); where ``p``'s subscripts hold the batch letter too, sample ``n``'s
    gradient is its slice ``n``. An added parameter gets the gradient of a broadcast sum
    (:func:`broadcast_grad`). ``call.data``: ``ins``/``out`` subscripts, the operands ``ops``
    (detached) and one ``part`` per use (``k``, ``alpha``, ``transposed``; or ``shape``,
    ``factor``; and its ``chain``)."""

    name = "contraction"
    takes_functions = True  # its terms read the parts, the parameter for ``chained`` only

    def terms(self, call, grads):
        G = grads[0]
        if G is None:
            return [None] * len(call.uses)
        d, tap = call.data, call.taps[0]
        out: list[Term | None] = []
        for u, part in zip(call.uses, d["parts"]):
            if "k" in part:
                V = _operand_grad(G, tap.bdim, d, part)
            else:
                V = broadcast_grad(G * part["factor"], tap.bdim, len(tap.shape), part["shape"])
            out.append(Vec(chained(V, u.param, part["chain"])))
        return out


def _operand_grad(G: torch.Tensor, b: int, d: dict, part: dict) -> torch.Tensor:
    """``(M, N, *operand)`` per-sample gradient of operand ``part["k"]`` of a contraction."""
    ins, ys, k = d["ins"], d["out"], part["k"]
    used = set("".join(ins)) | set(ys)
    Z = next(c for c in _LETTERS if c not in used)
    bl, pk = ys[b], ins[k]
    others = [o.to(G.dtype) for i, o in enumerate(d["ops"]) if i != k]
    lhs = ",".join([Z + ys] + [s for i, s in enumerate(ins) if i != k])
    if bl in pk:  # the operand runs along the batch: sample n's gradient is its slice n
        full = torch.einsum(f"{lhs}->{Z}{pk}", G, *others)  # (M, *operand)
        pos = pk.index(bl)
        N = full.shape[pos + 1]
        V = full.new_zeros(full.shape[0], N, *full.shape[1:])
        n = torch.arange(N, device=G.device)
        V.movedim(pos + 2, 2)[:, n, n] = full.movedim(pos + 1, 1)
    else:
        V = torch.einsum(f"{lhs}->{Z}{bl}{pk}", G, *others)
    if part["alpha"] != 1:
        V = V * part["alpha"]
    return V.transpose(-1, -2) if part["transposed"] else V


_LETTERS = "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba"

LINEAR = FunctionalLinearRule()
EMBEDDING = FunctionalEmbeddingRule()
CONV = FunctionalConvRule()
ELEMENTWISE = ElementwiseRule()
NORM = FunctionalNormRule()
CONV_TRANSPOSE = FunctionalConvTransposeRule()
CONTRACTION = ContractionRule()
EMBEDDING_BAG = EmbeddingBagRule()  # its terms read only call.data (see fimfast.functional)
