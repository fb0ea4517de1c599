"""``x + W``, ``x - W``, ``W - x``, ``x * W``, ``x / W`` for :class:`fimfast.functional.
FunctionalMode` with ``W`` a tensor computed from trainable parameters only
(:mod:`fimfast.derived_weights`) and broadcast into the batch's ``x``: a relative-position bias
gathered from a table by an index buffer (``table[index.view(-1)].view(T, T, H).permute(2, 0,
1)``, Swin and BEiT) added to the attention scores of every sample (told by sizes:
:func:`_broadcast`). The call is recorded like an
elementwise call on a parameter (:class:`fimfast.rules.functional.ElementwiseRule`: ``W``'s
per-sample gradient is the output gradient summed over the sample's elements down to ``W``'s
shape) with ``W`` as its use; the engine pulls it back to the parameters
(:mod:`fimfast.pullback`). Likewise ``F.linear(x, W, b)`` (:func:`linear`). Any other call goes
to :mod:`fimfast.functional`'s handler.
"""

from __future__ import annotations

from typing import Any

import torch

from fimfast.functional_derived import _bind
from fimfast.hooks import Use
from fimfast.rules import functional as frules
from fimfast.rules.base import UseKind

Tensor = torch.Tensor


OPS = (Tensor.add, torch.add, Tensor.__add__, Tensor.__radd__, Tensor.sub, torch.sub,
       Tensor.__sub__, Tensor.mul, torch.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.div,
       torch.div, Tensor.__truediv__, Tensor.true_divide, torch.true_divide)


def _broadcast(N: int | None, t: Any, x: Any) -> bool:
    """Whether ``t`` is broadcast into ``x`` along the batch: ``x`` has the batch's size ``N``
    in some dim where ``t`` (aligned from the right) has size 1, and in none where ``t`` has
    ``N`` too (a gate computed from the batch's input, ``x * gate`` with ``gate`` ``(N, C, 1,
    1)``, is left to the rules of its layers; an operation inside the function that makes a
    weight, ``v / sigma``, reads no batch). Told by sizes, not by the graph: once layer outputs
    are tapped directly, an activation's graph too reaches parameters only (the input has no
    gradient)."""
    if not (N is not None and N > 1 and isinstance(x, Tensor) and x.grad_fn is not None
            and isinstance(t, Tensor) and t.grad_fn is not None and t.numel() < x.numel()
            and t.dim() <= x.dim()):
        return False
    pairs = list(zip((1,) * (x.dim() - t.dim()) + tuple(t.shape), x.shape))
    return not any(a == N == b for a, b in pairs) and any(a == 1 and b == N for a, b in pairs)


def elementwise(mode, func, args, kwargs):
    """See the module docstring."""
    from fimfast import functional  # it imports this module

    # only where the model may have such a weight (fimfast.derived_weights.computed); the
    # cheap tests first: every elementwise call of a recorded forward comes here
    weights = getattr(mode.cap.derived, "weights", None)
    pos = None
    if weights is not None and not kwargs and len(args) == 2:
        N = mode.cap.batch_size
        pos = 0 if _broadcast(N, *args) else 1 if _broadcast(N, *args[::-1]) else None
    if (pos is None or mode.operand(args[pos]) or mode.operand(args[1 - pos])
            or not weights.made_from_parameters(args[pos])
            or any(v > 0 for v in mode.inside.values())):  # a rule's module: its rule
        return functional._elementwise(mode, func, args, kwargs)
    w, x = args[pos], args[1 - pos]
    y = func(*args)
    op = functional._OPS[func]
    if not isinstance(y, Tensor) or not y.is_floating_point():
        return y
    xd = x.detach()
    sign, deriv = 1, None
    if op == "mul":
        deriv = xd
    elif op == "div":
        deriv = 1 / xd if pos == 0 else -(xd / w.detach().square())
    elif op == "sub" and pos == 1:
        sign = -1
    data = {"deriv": deriv, "sign": sign, "shape": tuple(w.shape), "chain": None}
    return mode.record(op, frules.ELEMENTWISE, y, y.dim(), [Use(w, UseKind.VEC)], data)


def linear(mode, func, args, kwargs):
    """``F.linear(x, W, b)`` with ``W`` a 2-D weight computed from parameters (a parametrized
    attribute of a module without a rule, read in its forward), outside the forward of any
    module with a rule (whose own call is its rule's): the weight an :class:`~fimfast.rules.
    Outer` use, ``b`` a parameter or nothing. Anything else goes to :mod:`fimfast.functional`'s
    handler."""
    from fimfast import functional  # it imports this module

    weights = getattr(mode.cap.derived, "weights", None)
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    if weights is None or not isinstance(w, Tensor) or w.grad_fn is None:  # a parameter itself
        return functional._linear(mode, func, args, kwargs)
    b = _bind(args, kwargs, ("input", "weight", "bias"), (None, None, None))
    if b is None or not _linear_weight(mode, weights, *b[:2]):
        return functional._linear(mode, func, args, kwargs)
    x, w, bias = b
    pb = mode.param(bias)
    if bias is not None and pb is None:
        return functional._linear(mode, func, args, kwargs)
    y = func(x, w, bias)
    uses = [Use(w, UseKind.OUTER)] + ([Use(pb, UseKind.VEC)] if pb is not None else [])
    return mode.record("F.linear", frules.LINEAR, y, y.dim() - 1, uses, {"x": x.detach()})


def _linear_weight(mode, weights, x: Any, w: Any) -> bool:
    """Whether ``F.linear(x, w)`` uses ``w`` as a weight computed from parameters (not the
    batch's: no dim of the batch's size)."""
    N = mode.cap.batch_size
    return (isinstance(x, Tensor) and isinstance(w, Tensor) and w.dim() == 2
            and w.grad_fn is not None and (N is None or N not in w.shape)
            and mode.param(w) is None and mode.view_of(w) is None
            and weights.made_from_parameters(w)
            and not any(v > 0 for v in mode.inside.values()))
