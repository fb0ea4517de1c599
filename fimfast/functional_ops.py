"""More functional calls on parameters for :class:`fimfast.functional.FunctionalMode`: functional
norms, transposed convolutions and contractions.

* Elementwise functions of a parameter (``p.exp()``, ``2 * p``, ``p * mask``, ...):
  :mod:`fimfast.functional_derived`.
* ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm`` with parameters as weight and/or bias:
  ``weight`` gets ``sum_t G * xhat``, ``bias`` ``sum_t G`` per sample, as the module rules
  (:mod:`fimfast.rules.norm`).
* ``F.conv_transpose1d/2d/3d`` with a bare weight and/or bias: the module rule's terms
  (:class:`fimfast.rules.conv.ConvTransposeRule`, docs/math.md §4 "Transposed convolutions").
* ``torch.einsum`` (an ellipsis written out as letters), ``torch.bmm``, ``torch.baddbmm`` and
  ``torch.addmm`` with one parameter operand (and/or a parameter as the added ``input``):
  the per-sample gradient of the operand is itself a contraction of the output gradient with the
  other operands, formed per sample and column (a :class:`~fimfast.rules.Vec` of the
  parameter's size: ``M x N x numel`` per chunk of ``M`` columns, which the chunk size of
  :func:`fimfast.chunks.fast_columns` does not count; an operand for which one column's
  ``12 N numel`` bytes exceed ``FIMFAST_MEMORY_BUDGET_MB`` is left to the generic path).
  ``addmm(b, x, W)`` with ``alpha = beta = 1`` is a linear map (``x @ W + b``, the
  :class:`~fimfast.rules.Outer` of ``F.linear``).
* ``p.expand(...)``, ``p.expand_as(x)``, ``torch.broadcast_to(p, shape)`` and ``p.repeat(...)``
  repeating only dims where ``p`` has size 1: a parameter made one per sample (a class token
  ``cls.expand(N, -1, -1)`` concatenated to the patches, a learned initial state
  ``h0.expand(L, N, H)``). It is ``zeros + p`` broadcast: :class:`fimfast.rules.functional.
  ElementwiseRule`'s terms, sample ``n``'s gradient the output gradient at its slice summed down
  to ``p``'s shape; the probe finds which dim is the batch (none: a parameter expanded into a
  shared weight couples the samples, and it takes the generic path).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from fimfast import _env
from fimfast import functional_cells as fcells
from fimfast import functional_computed as fcomp
from fimfast import functional_derived as fder
from fimfast import functional_stacked as fstk
from fimfast.functional_derived import _UNARY, _bind, _relu, _reverse, _unary
from fimfast.hooks import Use
from fimfast.rules import functional as frules
from fimfast.rules.base import UseKind

F = torch.nn.functional
Tensor = torch.Tensor


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, int) else tuple(int(a) for a in v)


def expand_shared(cap, ids: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids, y)`` of a lookup shared by the batch expanded to it, as
    :class:`fimfast.rules.EmbeddingRule` expands ``nn.Embedding``'s (ids ``(1, T)``; ``(T,)``
    where the capture allows it, see :meth:`fimfast.persample.Engine.forward`): every
    broadcasting consumer sees the same values, and the tap gets per-sample gradients."""
    N = cap.batch_size
    if not cap.expand_broadcast or N is None or N < 2:
        return ids, y
    if ids.dim() >= 2 and ids.shape[0] == 1 and y.shape[0] == 1:
        cap.expanded += 1
        return ids.expand(N, *ids.shape[1:]), y.expand(N, *y.shape[1:])
    if cap.expand_flat and ids.dim() == 1 and y.dim() == 2 and ids.shape[0] != N:
        cap.expanded += 1
        cap.expanded_flat += 1
        return ids.unsqueeze(0).expand(N, -1), y.unsqueeze(0).expand(N, -1, -1)
    return ids, y


# --------------------------------------------------------------------------------------------- #
# norms, transposed convolutions
# --------------------------------------------------------------------------------------------- #
_NORM_ARGS = {
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"),
                   (None, None, None, None, 1e-5)),
    F.rms_norm: (("input", "normalized_shape", "weight", "eps"), (None, None, None, None)),
    F.group_norm: (("input", "num_groups", "weight", "bias", "eps"),
                   (None, None, None, None, 1e-5)),
}


def _affine(mode, b: list, slots: tuple[int, ...]) -> tuple[list, list[Use], list]:
    """The call's arguments with the parameters of ``slots`` made again, their uses and their
    chain factors."""
    b, uses, chains = list(b), [], []
    for i in slots:
        found = mode.operand(b[i])
        if found is not None:
            p, remake, chain = found
            b[i] = remake() if remake is not None else p
            uses.append(Use(p, UseKind.VEC))
            chains.append((i, chain))
    return b, uses, chains


def _norm(mode, func, args, kwargs):
    names, defaults = _NORM_ARGS[func]
    b = _bind(args, kwargs, names, defaults)
    if b is None or not isinstance(b[0], Tensor):
        return func(*args, **kwargs)
    slots = (2,) if func is F.rms_norm else (2, 3)
    b, uses, chains = _affine(mode, b, slots)
    if not uses:
        return func(*args, **kwargs)
    y = func(*b)
    x = b[0]
    if func is F.group_norm:
        if x.dim() < 2:
            return y
        lead, first, cfg = 1, True, {"groups": int(b[1])}
    else:
        shape = (b[1],) if isinstance(b[1], int) else tuple(b[1])
        lead, first, cfg = y.dim() - len(shape), False, {"shape": shape}
    eps = b[-1]
    if func is F.rms_norm and eps is None:
        eps = torch.finfo(x.dtype).eps
    data = {"x": x.detach(), "fn": func, "eps": eps, "roles": [i for i, _ in chains],
            "chains": [c for _, c in chains], **cfg}
    return mode.record(func.__name__, frules.NORM, y, lead, uses, data, batch_first=first)


_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
               "dilation")
_CONVT_DIMS = {torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}


def _conv_transpose(mode, func, args, kwargs):
    b = _bind(args, kwargs, _CONVT_ARGS, (None, None, None, 1, 0, 0, 1, 1))
    y = func(*args, **kwargs)
    if b is None:
        return y
    x, w, bias, stride, padding, _, groups, dilation = b
    nsp = _CONVT_DIMS[func]
    pw, pb = mode.param(w), mode.param(bias)
    if (
        (pw is None and pb is None) or not isinstance(x, Tensor) or not isinstance(w, Tensor)
        or x.dim() != nsp + 2 or w.dim() != nsp + 2 or isinstance(padding, str)
    ):
        return y  # an unbatched input has no sample dimension
    cfg = SimpleNamespace(
        groups=int(groups), padding=_tuple(padding, nsp), kernel_size=tuple(w.shape[2:]),
        dilation=_tuple(dilation, nsp), stride=_tuple(stride, nsp),
    )
    uses = [Use(pw, UseKind.OUTER, groups=cfg.groups, transposed=True)] if pw is not None else []
    uses += [Use(pb, UseKind.VEC)] if pb is not None else []
    return mode.record(f"F.conv_transpose{nsp}d", frules.CONV_TRANSPOSE, y, 1, uses,
                       {"x": x.detach(), "cfg": cfg}, batch_first=True)


# --------------------------------------------------------------------------------------------- #
# contractions
# --------------------------------------------------------------------------------------------- #
def _spec(spec: str, ops: tuple) -> tuple[list[str], str] | None:
    """``(input subscripts, output subscripts)`` of an einsum equation over the operands ``ops``
    (tensors), an ellipsis written out as letters the equation does not use, aligned from the
    right as einsum broadcasts it (``None``: a bad count, not letters, or ellipsis dims that
    differ in size between operands: broadcasting there is left to the generic path)."""
    spec = spec.replace(" ", "")
    ins, arrow, out = spec.partition("->")
    parts = ins.split(",")
    if len(parts) != len(ops):
        return None
    if "." in spec:
        parts, out = _ellipsis(spec, parts, out, arrow, ops)
        if parts is None:
            return None
    if not all(p.isalpha() for p in parts) or (out and not out.isalpha()):
        return None
    if not arrow:  # implicit output: the letters seen once, sorted (after an ellipsis's)
        letters = "".join(parts)
        out += "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in out))
    return parts, out


def _ellipsis(spec: str, parts: list[str], out: str, arrow: str, ops: tuple):
    """``(parts, out)`` with each ``...`` written out (see :func:`_spec`); ``(None, None)``
    where that cannot be done exactly."""
    free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec]
    sizes: dict[int, int] = {}  # position from the right -> size
    counts = []
    for part, op in zip(parts, ops):
        if not isinstance(op, Tensor) or part.count("...") > 1 or (
            "." in part.replace("...", "")
        ):
            return None, None
        e = op.dim() - len(part.replace("...", "")) if "..." in part else 0
        if e < 0:
            return None, None
        for j in range(e):  # the ellipsis dims of this operand, from the right
            size = op.shape[len(part.split("...")[0]) + e - 1 - j]
            if sizes.setdefault(j, size) != size:
                return None, None
        counts.append(e)
    E = max(counts, default=0)
    if E > len(free) or out.count("...") > 1 or "." in out.replace("...", ""):
        return None, None
    letters = "".join(free[:E])
    parts = [p.replace("...", letters[E - e:]) for p, e in zip(parts, counts)]
    out = out.replace("...", letters) if arrow else letters
    return parts, out


def _contract(mode, func, spec, ops, bias=None, alpha=1, beta=1):
    """Record a contraction ``alpha * einsum(spec, *ops) (+ beta * bias)`` with one parameter
    among ``ops`` and/or ``bias``; run ``func`` on the operands made again."""
    if not all(isinstance(o, Tensor) for o in ops):
        return None
    parsed = _spec(spec, ops)
    if parsed is None:
        return None
    found = [_operand_any(mode, o) for o in ops]
    k = [i for i, f in enumerate(found) if f is not None]
    fb = mode.operand(bias) if isinstance(bias, Tensor) else None
    if len(k) > 1 or (not k and fb is None) or not all(
        isinstance(a, (int, float)) for a in (alpha, beta)
    ):
        return None
    ops, uses, parts = list(ops), [], []
    if k:
        (k,) = k
        p, transposed, remake, chain = found[k]
        pk, rest = parsed[0][k], set(parsed[1]).union(*(s for i, s in enumerate(parsed[0])
                                                           if i != k))
        if len(set(pk)) != len(pk) or not set(pk) <= rest:
            return None  # a diagonal of the parameter, or a letter summed in it alone
        if 12 * (mode.cap.batch_size or 1) * p.numel() > _env.memory_budget_bytes():
            return None  # one column's per-sample gradients would not fit the budget
        ops[k] = remake() if remake is not None else p
        uses.append(Use(p, UseKind.VEC))
        parts.append({"k": k, "alpha": alpha, "transposed": transposed, "chain": chain})
    if fb is not None:
        pb, remake, chain = fb
        bias = remake() if remake is not None else pb
        uses.append(Use(pb, UseKind.VEC))
        parts.append({"shape": tuple(bias.shape), "factor": beta, "chain": chain})
    y = func(ops, bias)
    data = {"ins": parsed[0], "out": parsed[1], "parts": parts,
            "ops": [o.detach() for o in ops]}
    return y, uses, data


def _operand_any(mode, t) -> tuple | None:
    """``(param, transposed, remake, chain)`` of a parameter, a view or a function of one."""
    p = mode.param(t)
    if p is not None:
        return p, False, None, None
    return mode.view_of(t) or fcomp.operand(mode, t)  # a weight computed from parameters


def _record_contract(mode, func, run, args, kwargs, spec, ops, **extra):
    """Record ``func(*args, **kwargs)``, the contraction ``spec`` of ``ops`` that ``run(ops,
    bias)`` computes (see :func:`_contract`), or just run it."""
    got = _contract(mode, run, spec, ops, **extra)
    if got is None:
        return func(*args, **kwargs)
    y, uses, data = got
    return mode.record(func.__name__, frules.CONTRACTION, y, y.dim(), uses, data)


def _einsum(mode, func, args, kwargs):
    if kwargs or len(args) < 2 or not isinstance(args[0], str):
        return func(*args, **kwargs)
    ops = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    return _record_contract(mode, func, lambda o, b: func(args[0], *o), args, kwargs, args[0],
                            ops)


def batched_matmul(mode, func, x: Tensor, w: Tensor):
    """``x @ w`` with both operands at least 2-D and one at least 3-D: a 2-D parameter against
    a batch of matrices is a linear map (:func:`fimfast.functional._matmul`'s ``Outer``); a
    parameter of 3 or more dims (per-head weights ``(H, d, e)`` against ``(N, H, T, d)``) is
    the contraction ``...ij,...jk->...ik`` (the batch dims broadcast from the right)."""
    fx, fw = _operand_any(mode, x), _operand_any(mode, w)
    p = fx or fw
    if p is None or (fx is not None and fw is not None) or p[0].dim() < 3:
        if p is not None and p[0].dim() == 2:
            return None  # the caller's linear map
        return func(x, w)
    return _record_contract(mode, func, lambda o, b: func(*o), (x, w), {}, "...ij,...jk->...ik",
                            (x, w))


def _bmm(mode, func, args, kwargs):
    if kwargs or len(args) != 2:
        return func(*args, **kwargs)
    return _record_contract(mode, func, lambda o, b: func(*o), args, kwargs, "bij,bjk->bik",
                            args)


def _addmm(mode, func, args, kwargs):
    b = _bind(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"), (None,) * 3 + (1, 1))
    if b is None or not all(isinstance(t, Tensor) for t in b[:3]):
        return func(*args, **kwargs)
    bias, m1, m2, beta, alpha = b
    spec = _MM[func]
    if spec == "ij,jk->ik" and alpha == 1 and beta == 1:
        linear = _addmm_linear(mode, bias, m1, m2)
        if linear is not None:
            return linear

    def run(o, bb):
        return func(bb, *o, beta=beta, alpha=alpha)

    return _record_contract(mode, func, run, args, kwargs, spec, (m1, m2), bias=bias,
                            alpha=alpha, beta=beta)


_MM = {torch.addmm: "ij,jk->ik", Tensor.addmm: "ij,jk->ik", torch.baddbmm: "bij,bjk->bik",
       Tensor.baddbmm: "bij,bjk->bik"}


def _addmm_linear(mode, bias, x, w):
    """``addmm(b, x, W)`` = ``x @ W + b``: ``F.linear``'s terms (``W`` stored ``(I, O)``, or
    ``W.t()`` of a weight stored ``(O, I)``); ``None`` if it is not that."""
    found = fder.weight_of(mode, w)
    if found is None:
        return None
    p, view = found
    pb = mode.param(bias)
    if mode.operand(x) is not None or (pb is not None and pb.dim() != 1) or (
        pb is None and mode.operand(bias) is not None
    ):
        return None
    y = torch.addmm(bias, x, view[2]() if view is not None else p)
    uses = [fder.outer_use(p, view, True)]
    uses += [Use(pb, UseKind.VEC)] if pb is not None else []
    return mode.record("addmm", frules.LINEAR, y, 1, uses, {"x": x.detach()})


_EXPANDS = {Tensor.expand, Tensor.expand_as, Tensor.broadcast_to, torch.broadcast_to,
            Tensor.repeat}


def _expand(mode, func, args, kwargs):
    """A parameter (or a view or elementwise function of one) broadcast to a larger shape: see
    the module docstring."""
    found = mode.operand(args[0]) if args else None
    if found is None:
        return func(*args, **kwargs)
    p, remake, chain = found
    pv = remake() if remake is not None else p
    y = func(pv, *args[1:], **kwargs)
    if not isinstance(y, Tensor) or not y.is_floating_point():
        return y
    if func is Tensor.repeat:  # a copy per repeat: a broadcast only along dims of size 1
        shape = (1,) * (y.dim() - pv.dim()) + tuple(pv.shape)
        if any(a != b and b != 1 for a, b in zip(y.shape, shape)):
            return y  # a tiled parameter: its edge is no recorded call's (generic path)
    data = {"deriv": None, "sign": 1, "shape": tuple(pv.shape), "chain": chain}
    return mode.record("expand", frules.ELEMENTWISE, y, y.dim(), [Use(p, UseKind.VEC)], data)


HANDLERS: dict[Callable, Callable] = {
    **dict.fromkeys(fcomp.OPS, fcomp.elementwise),  # x + W, W computed from parameters
    # F.linear(x, W), W computed from parameters or a slice W[e] (fstk, below); likewise:
    **dict.fromkeys((torch.matmul, Tensor.matmul, Tensor.__matmul__), fcomp.matmul),
    **dict.fromkeys((torch.conv1d, torch.conv2d, torch.conv3d), fcomp.conv),
    **dict.fromkeys(_UNARY, _unary),
    **dict.fromkeys(_EXPANDS, _expand),
    F.relu: _relu,
    **dict.fromkeys((Tensor.__rsub__, Tensor.__rdiv__, Tensor.__rtruediv__), _reverse),
    **dict.fromkeys(_NORM_ARGS, _norm),
    **dict.fromkeys(_CONVT_DIMS, _conv_transpose),
    torch.einsum: _einsum,
    torch.bmm: _bmm,
    Tensor.bmm: _bmm,
    **dict.fromkeys(_MM, _addmm),
    **fcells.HANDLERS,  # torch.gru_cell, torch.lstm_cell, ... on parameters
    **fstk.HANDLERS,  # W[e], F.linear(x, W[e], b[e]): stacked experts
}
"""Handlers of the calls this module recognises (merged into :mod:`fimfast.functional`'s)."""
