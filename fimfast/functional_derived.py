"""Tensors made from a trainable parameter by an elementwise function, for
:class:`fimfast.functional.FunctionalMode`: ``p.exp()``, ``torch.sigmoid(p)``, ``F.softplus(p)``,
``p.clamp(max=...)``, ``p ** 2``, ``2 * p``, ``1 + p``, ``p * mask`` and ``p / gain`` with a
tensor without gradient in ``p``'s shape (a pruning mask), and chains of them, with reshaped views
in between.

Such a tensor ``s`` is remembered like a view (``FunctionalMode.remember``): the call that
consumes it makes it again from the parameter, and its derivative ``ds/dp`` (elementwise,
detached) is the ``chain`` of the use (the chain rule: ``dL/dp = dL/ds * ds/dp``, docs/math.md
§4). Where ``s`` is small (elementwise with an activation: a learnable log-temperature, the affine
of a functional norm, an operand of a contraction) the rule multiplies each per-sample gradient
by it; where it is the weight of ``F.linear``, ``@``, ``F.conv*`` or of a module with a rule
(``torch.nn.utils.prune`` sets ``module.weight = weight_orig * weight_mask`` in a forward
pre-hook: :func:`remake_attributes`), the use carries it (``hooks.Use.chain``) and the engine
scales the parameter's squares by ``chain**2`` (one chain for all its uses: a pruned weight used
by several calls; uses with different chains: the generic path).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from fimfast.hooks import Use
from fimfast.rules.base import UseKind

F = torch.nn.functional
Tensor = torch.Tensor


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list | None:
    """The arguments ``names`` from positional ``args`` then ``kwargs`` (``None`` for an
    unexpected keyword)."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    out = list(args) + list(defaults[len(args):])
    for i, n in enumerate(names):
        if n in kwargs:
            out[i] = kwargs[n]
    return out


def with_arg(args: tuple, kwargs: dict, names: tuple[str, ...], name: str, value: Any):
    """``(args, kwargs)`` of a call with argument ``name`` replaced by ``value``."""
    if name in kwargs:
        return args, {**kwargs, name: value}
    k = names.index(name)
    return (*args[:k], value, *args[k + 1:]), kwargs


def _derive(mode, base: tuple, out: Any, remake: Callable[[Tensor], Tensor], d: Any) -> Any:
    """Remember ``out = f(s)``, ``s`` the tensor of ``base`` (``mode.operand``), made again by
    ``remake(s)``, with elementwise derivative ``d = df/ds`` (detached, ``s``'s shape, or a
    number)."""
    p, src, chain = base
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() != p.numel():
        return out
    d = torch.as_tensor(d, dtype=out.dtype, device=out.device).expand(out.shape).reshape(p.shape)
    chain = d if chain is None else chain * d

    def again() -> Tensor:
        return remake(src() if src is not None else p)

    mode.remember(out, p, False, again, chain)
    return out


def scalar_op(mode, func, args: tuple, op: str) -> Any:
    """``p * c``, ``c * p``, ``p / c``, ``c / p``, ``p + c``, ``c + p``, ``p - c``, ``c - p`` with
    ``c`` a number: a function of ``p``."""
    out = func(*args)
    pos = 0 if isinstance(args[0], Tensor) else 1
    c = args[1 - pos]
    base = mode.operand(args[pos])
    if base is None or not isinstance(c, (int, float)) or isinstance(out, tuple):
        return out
    return _derive(mode, base, out, lambda t: func(*((t, c) if pos == 0 else (c, t))),
                   _op_derivative(op, pos, c, out, args[pos]))


def _op_derivative(op: str, pos: int, c: Any, out: Tensor, s: Tensor) -> Any:
    """``d out / d s`` of ``out = s (op) c`` (``pos`` 0) or ``c (op) s`` (``pos`` 1)."""
    if op == "mul":
        return c
    if op == "div":
        return 1 / c if pos == 0 else -out.detach() / s.detach()
    return -1 if (op == "sub" and pos == 1) else 1


def tensor_op(mode, func, args: tuple, op: str, pos: int, base: tuple) -> Any:
    """``s = p * c``, ``p / c``, ``c / p``, ``p + c``, ``p - c``, ... with ``c`` a tensor without
    gradient that leaves ``p``'s shape as it is (a pruning mask, a fixed gain): a function of
    ``p``, ``base`` its :meth:`~fimfast.functional.FunctionalMode.operand`. Whatever ``c`` holds
    (the batch too), ``ds/dp`` is the derivative of this elementwise map, so a call consuming
    ``s`` gives ``p`` the per-row gradient of that call's term times it."""
    out = func(*args)
    if not isinstance(out, Tensor):
        return out
    c = args[1 - pos]
    return _derive(mode, base, out, lambda t: func(*((t, c) if pos == 0 else (c, t))),
                   _op_derivative(op, pos, c, out, args[pos]))


def _reverse(mode, func, args, kwargs):
    """``c - p`` and ``c / p`` with ``c`` a number (``p.__rsub__(c)``, ``p.__rdiv__(c)``)."""
    out = func(*args, **kwargs)
    base = mode.operand(args[0]) if len(args) == 2 and not kwargs else None
    if base is None or not isinstance(args[1], (int, float)) or not isinstance(out, Tensor):
        return out
    c = args[1]
    d = -1 if func is Tensor.__rsub__ else -out.detach() / args[0].detach()
    return _derive(mode, base, out, lambda t: func(t, c), d)


def _softplus(v, y, rest, kw):
    b = _bind(rest, kw, ("beta", "threshold"), (1.0, 20.0))
    if b is None:
        return None
    beta, th = b
    return torch.where(v * beta > th, torch.ones_like(v), torch.sigmoid(v * beta))


def _clamp(v, y, rest, kw):
    b = _bind(rest, kw, ("min", "max"), (None, None))
    if b is None or not all(a is None or isinstance(a, (int, float)) for a in b):
        return None
    keep = torch.ones_like(v, dtype=torch.bool)
    if b[0] is not None:
        keep &= v >= b[0]
    if b[1] is not None:
        keep &= v <= b[1]
    return keep.to(v.dtype)


def _pow(v, y, rest, kw):
    e = rest[0] if len(rest) == 1 and not kw else kw.get("exponent") if not rest else None
    if not isinstance(e, (int, float)) or isinstance(e, bool):
        return None
    return torch.zeros_like(v) if e == 0 else e * v.pow(e - 1)


def _plain(fn):
    """A derivative that takes no arguments besides the tensor."""
    return lambda v, y, rest, kw: None if rest or kw else fn(v, y)


# func -> derivative(v, y, rest, kwargs) (``v`` the argument, ``y`` the result, detached;
# ``None``: a configuration the rule does not know)
_UNARY: dict[Callable, Callable] = {}
for _fs, _d in (
    ((Tensor.exp, torch.exp), _plain(lambda v, y: y)),
    ((Tensor.expm1, torch.expm1), _plain(lambda v, y: y + 1)),
    ((Tensor.sigmoid, torch.sigmoid), _plain(lambda v, y: y * (1 - y))),
    ((Tensor.tanh, torch.tanh), _plain(lambda v, y: 1 - y * y)),
    ((Tensor.log, torch.log), _plain(lambda v, y: 1 / v)),
    ((Tensor.log1p, torch.log1p), _plain(lambda v, y: 1 / (1 + v))),
    ((Tensor.sqrt, torch.sqrt), _plain(lambda v, y: 0.5 / y)),
    ((Tensor.rsqrt, torch.rsqrt), _plain(lambda v, y: -0.5 * y * y * y)),
    ((Tensor.reciprocal, torch.reciprocal), _plain(lambda v, y: -y * y)),
    ((Tensor.square, torch.square), _plain(lambda v, y: 2 * v)),
    ((Tensor.neg, torch.neg, Tensor.__neg__), _plain(lambda v, y: -torch.ones_like(v))),
    ((Tensor.abs, torch.abs), _plain(lambda v, y: torch.sign(v))),
    ((Tensor.relu, torch.relu), _plain(lambda v, y: (y > 0).to(v.dtype))),
    ((F.softplus,), _softplus),
    ((Tensor.clamp, torch.clamp, Tensor.clip, torch.clip), _clamp),
    ((Tensor.pow, torch.pow, Tensor.__pow__), _pow),
):
    _UNARY.update(dict.fromkeys(_fs, _d))


def _unary(mode, func, args, kwargs):
    out = func(*args, **kwargs)
    base = mode.operand(args[0]) if args else None
    if base is None or not isinstance(out, Tensor) or out.shape != args[0].shape:
        return out
    rest = args[1:]
    d = _UNARY[func](args[0].detach(), out.detach(), rest, kwargs)
    if d is None:
        return out
    return _derive(mode, base, out, lambda t: func(t, *rest, **kwargs), d)


def _relu(mode, func, args, kwargs):
    b = _bind(args, kwargs, ("input", "inplace"), (None, False))
    if b is None or b[1]:
        return func(*args, **kwargs)
    return _unary(mode, torch.relu, (b[0],), {})


def constant(mode, x: Tensor, s: Tensor) -> bool:
    """Whether ``x`` in ``s * x`` (``s`` a parameter or a function of one) makes a function of
    the parameter (a mask, a gain) rather than a use by the batch: ``x`` without gradient,
    leaving ``s``'s shape as it is, and not possibly the batch (a leading dim of the batch size:
    then only a buffer of the model; a parameter with a row per sample of the batch, ``x *
    slot``, is the rules' elementwise use)."""
    if x.requires_grad or torch.broadcast_shapes(x.shape, s.shape) != s.shape:
        return False
    N = mode.cap.batch_size
    if x.dim() == 0 or N is None or x.shape[0] != N:
        return True
    return any(b is x for b in mode.cap.model.buffers())


def remake_attributes(mode, module: torch.nn.Module) -> list | None:
    """Make again, for this forward of ``module`` (which has a rule), each plain tensor
    attribute that is an elementwise function of one of its parameters made earlier in this
    forward, in the parameter's shape: ``torch.nn.utils.prune`` sets ``weight = weight_orig *
    weight_mask`` in a forward pre-hook. The rule then lists the new tensor
    (:func:`fimfast.rules.base.trainable`, ``FunctionalMode.derived``), consumed by this
    forward only; the one the model made is left without a consumer in the graph (used
    anywhere else too, it adds an edge into the parameter that no call declares: the generic
    path). The attributes are put back when the forward returns."""
    swapped = []
    for name, t in list(vars(module).items()):
        if not isinstance(t, Tensor) or isinstance(t, torch.nn.Parameter):
            continue
        v = mode.views.get(id(t))
        if v is None or v[0]() is not t or t._version != v[5] or v[2]:
            continue
        p = v[1]
        if id(module) not in mode.owners.get(id(p), ()) or tuple(t.shape) != tuple(p.shape):
            continue
        new = v[3]()
        mode.made[id(new)] = (weakref.ref(new), p, v[4])
        setattr(module, name, new)  # as prune sets it (an RNN updates its list of weights)
        swapped.append((name, t))
    if swapped:
        mode.recorded += 1  # later steps need the mode too
    return swapped or None


def weight_of(mode, w: Any) -> tuple | None:
    """``(param, view or None)`` of a 2-D parameter, of the transpose of one, or of an
    elementwise function of one in its own shape (a masked weight ``W * mask``: the view's
    ``chain``) (``mode``: the :class:`fimfast.functional.FunctionalMode` recording the call)."""
    p, view = mode.param(w), None
    if p is None:
        view = mode.view_of(w)
        if view is None or not (view[1] or tuple(w.shape) == tuple(view[0].shape)):
            return None
        p = view[0]
    return (p, view) if p.dim() == 2 else None


def outer_use(p: Tensor, view: tuple | None, stored_io: bool) -> Use:
    """The OUTER use of ``p`` by a call that reads its weight operand, ``p`` or ``view``
    (:func:`weight_of`), as ``(I, O)`` (``stored_io``: ``x @ W``) or ``(O, I)`` (``F.linear``,
    ``W @ x``)."""
    flipped = view is not None and view[1]
    chain = None if view is None else view[3]
    return Use(p, UseKind.OUTER, transposed=stored_io != flipped, chain=chain)




def bias_of(mode: Any, bias: Any) -> tuple:
    """``(param, None)`` of a parameter ``bias`` (of :meth:`FunctionalMode.param`);
    ``(param, (remake, chain))`` of an elementwise function of one in its shape (or a reshaped
    view of one: ``chain`` ``None``, not taken), ``F.linear(x, W, torch.tanh(b))``; ``(None,
    None)`` otherwise."""
    pb = mode.param(bias)
    found = mode.operand(bias) if pb is None and isinstance(bias, torch.Tensor) else None
    if found is None or found[2] is None or found[0].shape != bias.shape:
        return pb, None
    return found[0], (found[1], found[2])
