"""``x + W``, ``x - W``, ``W - x``, ``x * W``, ``x / W`` for :class:`fimfast.functional.
FunctionalMode` with ``W`` a tensor computed from trainable parameters only
(:mod:`fimfast.derived_weights`) and broadcast into the batch's ``x``: a relative-position bias
gathered from a table by an index buffer (``table[index.view(-1)].view(T, T, H).permute(2, 0,
1)``, Swin and BEiT) added to the attention scores of every sample (told by sizes:
:func:`_broadcast`). The call is recorded like an
elementwise call on a parameter (:class:`fimfast.rules.functional.ElementwiseRule`: ``W``'s
per-sample gradient is the output gradient summed over the sample's elements down to ``W``'s
shape) with ``W`` as its use; the engine pulls it back to the parameters
(:mod:`fimfast.pullback`). Likewise ``F.linear(x, W, b)`` (:func:`linear`; ``b`` computed from
parameters too), ``x @ W`` and ``W @ x`` with a 2-D ``W`` (:func:`matmul`), ``F.conv1d/2d/3d(x,
W, b)`` (:func:`conv`) and a contraction's operand (``torch.einsum``, ``bmm``, ...:
:func:`operand`, read by :mod:`fimfast.functional_ops`): a
cosine classifier ``x @ F.normalize(W, dim=0)``, a weight-standardized convolution
``F.conv2d(x, (W - mean) / std)``. Any other call goes to :mod:`fimfast.functional`'s handler.
"""

from __future__ import annotations

from typing import Any

import torch

from fimfast import functional_derived as fder
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


def site_ids(cap, uses: list[Use]) -> tuple:
    """What names the site of a call by its uses (:meth:`fimfast.functional.FunctionalMode.
    record`): the id of each parameter, or of the slot of a weight computed from parameters
    (:meth:`fimfast.derived_weights.Weights.lookup`), the same from step to step (not the
    weight, made anew by each forward), so that the plan of the call is reused."""
    out = []
    for u in uses:
        p = u.param
        if id(p) not in cap.param_ids and cap.derived is not None:
            found = cap.derived(p)
            p = p if found is None else found[0]
        out.append(id(p))
    return tuple(out)


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
        if weights is not None and not kwargs and len(args) == 2 and _inside_weight(
                mode, weights, *args):
            return func(*args)  # W - W.mean(): a step of a weight computed from parameters
        return functional._elementwise(mode, func, args, kwargs)
    w, x = args[pos], args[1 - pos]
    y = func(*args)
    op = functional._OPS[func]
    if not isinstance(y, Tensor) or not y.is_floating_point():
        return y
    return record_elementwise(mode, op, y, x, w, pos, w, None)


def record_elementwise(mode, op: str, y: Tensor, x: Tensor, w: Tensor, pos: int, use: Tensor,
                       chain: Any) -> Tensor:
    """Record ``y = w op x`` (``x op w`` for ``pos == 1``; ``op`` one of ``add``, ``sub``,
    ``mul``, ``div``) as an elementwise call on ``use`` (the parameter, or the slot of a weight
    computed from parameters): :class:`fimfast.rules.functional.ElementwiseRule`'s data, the
    derivative of ``y`` in ``w`` and ``chain`` (:mod:`fimfast.functional_derived`). Any dim of
    ``y`` may be the batch: the probe decides."""
    xd = x.detach()
    sign, deriv = 1, None
    if op == "mul":
        deriv = xd
    elif op == "div":
        deriv = 1 / xd if pos == 0 else -(xd / w.detach().square())
    elif op == "sub" and pos == 1:
        sign = -1
    data = {"deriv": deriv, "sign": sign, "shape": tuple(w.shape), "chain": chain}
    return mode.record(op, frules.ELEMENTWISE, y, y.dim(), [Use(use, UseKind.VEC)], data)


def _inside_weight(mode, weights, a: Any, b: Any) -> bool:
    """Whether ``a (op) b`` combines a parameter (or a view or elementwise function of one) with
    a tensor computed from parameters only, with no dim of the batch's size (``W -
    W.mean(dims)``, ``W / W.norm()``): a step of a weight computed from parameters, not a use
    of the parameter by the batch; the call that consumes the weight is recorded
    (:func:`linear`, :func:`conv`, ...). The cheap tests first."""
    N = mode.cap.batch_size
    if N is None or not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return False
    for p, t in ((a, b), (b, a)):
        if (t.grad_fn is not None and N not in t.shape and mode.operand(p) is not None
                and mode.operand(t) is None and weights.made_from_parameters(t)):
            return True
    return False


def linear(mode, func, args, kwargs):
    """``F.linear(x, W, b)`` with ``W`` a 2-D weight computed from parameters (a parametrized
    attribute of a module without a rule, read in its forward) or a parameter, and ``b`` a
    parameter, a 1-D bias computed from parameters (``b = f(theta)``) or nothing, at least one of
    them computed, outside the forward of any module with a rule (whose own call is its rule's):
    the weight an :class:`~fimfast.rules.Outer` use, the bias a ``Vec`` use. Anything else goes
    to :mod:`fimfast.functional`'s handler."""
    from fimfast import functional  # it imports this module

    weights = getattr(mode.cap.derived, "weights", None)
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if (weights is None or not isinstance(w, Tensor)  # W and b parameters themselves
            or (w.grad_fn is None and getattr(bias, "grad_fn", None) is None)):
        return functional._linear(mode, func, args, kwargs)
    b = _bind(args, kwargs, ("input", "weight", "bias"), (None, None, None))
    if b is None:
        return functional._linear(mode, func, args, kwargs)
    x, w, bias = b
    pw = w if w.grad_fn is not None and _linear_weight(mode, weights, x, w) else None
    computed = pw is not None
    if pw is None and w.dim() == 2 and mode.view_of(w) is None:
        pw = mode.param(w)
    pb, bchain = fder.bias_of(mode, bias)  # a parameter, or an elementwise function of one
    if pb is None and bias is not None and pw is not None and _linear_weight(
            mode, weights, x, bias, 1) and bias.shape[0] == w.shape[0]:
        pb, computed = bias, True  # a bias computed from parameters
    if pw is None or not computed or (bias is not None and pb is None):
        return functional._linear(mode, func, args, kwargs)
    if bchain is not None:
        bias, bchain = bchain[0](), bchain[1]
    y = func(x, w, bias)
    uses = [Use(pw, UseKind.OUTER)] + ([Use(pb, UseKind.VEC, chain=bchain)]
                                       if pb is not None else [])
    return mode.record("F.linear", frules.LINEAR, y, y.dim() - 1, uses, {"x": x.detach()})


def _linear_weight(mode, weights, x: Any, w: Any, dims: int | None = 2) -> bool:
    """Whether ``F.linear(x, w)`` (a call with input ``x`` and weight ``w``) uses ``w`` as a
    weight computed from parameters, of ``dims`` dims (``None``: any), not the batch's (no dim
    of the batch's size), outside the forward of a module with a rule. The cheap tests first:
    every such call of a captured forward comes here."""
    N = mode.cap.batch_size
    return (isinstance(x, Tensor) and isinstance(w, Tensor) and w.grad_fn is not None
            and (dims is None or w.dim() == dims) and (N is None or N not in w.shape)
            and mode.param(w) is None and mode.view_of(w) is None
            and not any(v > 0 for v in mode.inside.values())
            and weights.made_from_parameters(w))


def operand(mode, t: Any) -> tuple | None:
    """``(t, False, None, None)`` (a parameter's operand, see ``functional_ops._operand_any``)
    when ``t`` is a weight computed from parameters (:func:`_linear_weight`, any dims), else
    ``None``."""
    weights = getattr(mode.cap.derived, "weights", None)
    if weights is None or not _linear_weight(mode, weights, t, t, None):
        return None
    return t, False, None, None


def matmul(mode, func, args, kwargs):
    """``x @ W`` with ``x`` at least 2-D and ``W`` a 2-D weight computed from parameters (stored
    ``(I, O)``): a linear map, ``W`` an :class:`~fimfast.rules.Outer` use; ``W @ x`` with ``W``
    such a weight (stored ``(O, I)``) and ``x`` ``(..., I, K)`` holding the batch: ``(W @ x)^T =
    x^T W^T``, a linear map of ``x^T`` (as for a parameter, ``functional._left_matmul``).
    Anything else goes to :mod:`fimfast.functional`'s handler."""
    from fimfast import functional  # it imports this module

    weights = getattr(mode.cap.derived, "weights", None)
    if weights is None or kwargs or len(args) != 2 or not all(isinstance(a, Tensor)
                                                               for a in args):
        return functional._matmul(mode, func, args, kwargs)
    x, w = args
    if x.dim() >= 2 and _linear_weight(mode, weights, x, w):
        y = func(x, w)
        use = Use(w, UseKind.OUTER, transposed=True)
        return mode.record("matmul", frules.LINEAR, y, y.dim() - 1, [use], {"x": x.detach()})
    w, x = args
    N = mode.cap.batch_size
    if x.dim() >= 2 and N is not None and N in x.shape and _linear_weight(mode, weights, x, w):
        yt = func(w, x).mT
        out = mode.record("left matmul", frules.LINEAR, yt, yt.dim() - 1,
                          [Use(w, UseKind.OUTER)], {"x": x.detach().mT})
        return out.mT
    return functional._matmul(mode, func, args, kwargs)


def conv(mode, func, args, kwargs):
    """``F.conv1d/2d/3d(x, W, b, ...)`` on a batched ``x`` with ``W`` computed from parameters
    and ``b`` a parameter or nothing: :class:`fimfast.rules.functional.FunctionalConvRule`'s
    terms, ``W`` an :class:`~fimfast.rules.Outer` use. Anything else goes to
    :mod:`fimfast.functional`'s handler."""
    from fimfast import functional  # it imports this module

    weights = getattr(mode.cap.derived, "weights", None)
    nsp = functional._CONV_DIMS[func]
    b = _bind(args, kwargs, functional._CONV_ARGS, (None, None, None, 1, 0, 1, 1))
    if (weights is None or b is None or not isinstance(b[0], Tensor) or b[0].dim() != nsp + 2
            or not _linear_weight(mode, weights, b[0], b[1], nsp + 2)):
        return functional._conv(mode, func, args, kwargs)
    x, w, bias, stride, padding, dilation, groups = b
    pb, bchain = fder.bias_of(mode, bias)  # a parameter or an elementwise function of one
    if bias is not None and pb is None:
        return functional._conv(mode, func, args, kwargs)
    if bchain is not None:
        args, kwargs = fder.with_arg(args, kwargs, functional._CONV_ARGS, "bias", bchain[0]())
    y = func(*args, **kwargs)
    kernel, dilation = tuple(w.shape[2:]), functional._tuple(dilation, nsp)
    data = {
        "x": x.detach(), "kernel": kernel, "stride": functional._tuple(stride, nsp),
        "padding": frules.conv_padding(padding, kernel, dilation), "dilation": dilation,
        "groups": int(groups),
    }
    uses = [Use(w, UseKind.OUTER, groups=int(groups))]
    if pb is not None:
        uses.append(Use(pb, UseKind.VEC, chain=None if bchain is None else bchain[1]))
    return mode.record(f"F.conv{nsp}d", frules.CONV, y, 1, uses, data, batch_first=True)
