"""Capture of functional calls that use trainable parameters outside any module with a rule.

A weight used in ``forward`` through a functional call (``F.linear(h, self.wte.weight)``, a
tied output layer; ``x @ self.W``; ``F.conv2d(x, self.kernel)``; ``logits / self.tau``) has no
module whose forward hook could record it. While the estimator's forward runs,
:class:`FunctionalMode` (a ``torch.overrides.TorchFunctionMode``) sees every torch function call
and records the recognised ones whose weight is a trainable parameter, exactly as a module rule's
hook records a module call (:mod:`fimfast.hooks`): their input, detached, and a tap on their
output, in a :class:`~fimfast.hooks.Call` whose rule is one of :mod:`fimfast.rules.functional`.

Recognised (each consumes its parameters once, one autograd edge each, as the engine's edge
count requires; anything else leaves the parameter to the generic path):

* ``F.linear(x, W, b)``: ``W`` (2-D, its transpose, ``W * mask``, a slice ``W[e]``: see
  :mod:`fimfast.functional_stacked`) and/or ``b`` (``b``, ``b[e]``, ``torch.tanh(b)``), on rows
  routed from the batch or folded into its first dim too (``functional_stacked.record``);
* ``x @ W``, ``torch.matmul(x, W)``, ``x.matmul(W)`` with ``W`` a 2-D parameter (stored
  ``(I, O)``) or its transpose (``W.t()``, ``W.T``, ``W.mT``, ``W.transpose(0, 1)``), ``x`` at
  least 2-D; ``W @ x`` (the linear map of ``x^T``); a ``W`` of 3+ dims: ``batched_matmul``;
* ``F.embedding(ids, W, padding_idx, max_norm)`` (not ``scale_grad_by_freq``), ids shared by the
  batch (``(1, T)``, or ``(T,)`` once checked) expanded to it as ``nn.Embedding``'s are;
* ``F.embedding_bag(ids, W, offsets, ..., mode, per_sample_weights, include_last_offset,
  padding_idx)``, one bag per sample (:class:`fimfast.rules.EmbeddingBagRule`'s terms);
* ``F.conv1d``/``F.conv2d``/``F.conv3d(x, W, b, ...)`` on batched inputs;
* ``x * p``, ``p * x``, ``x / p``, ``p / x``, ``x + p``, ``p + x``, ``x - p``, ``p - x`` (operators,
  ``torch.mul``/``div``/``add``/``sub`` and the methods, without ``alpha``, ``rounding_mode`` or
  ``out``) with ``x`` a tensor and ``p`` a parameter, or a ``view``/``reshape``/``unsqueeze`` of
  one (a scalar temperature or gain, a per-channel scale, a learned positional table added to
  ``(N, T, d)`` or ``(T, N, d)`` activations);
* elementwise functions of a parameter, functional norms, transposed convolutions and
  contractions (``einsum``, ``bmm``, ``baddbmm``, ``addmm``): :mod:`fimfast.functional_ops`.

A call inside the forward of a module that has a rule, with a parameter of that module, is left
to the module's rule (``nn.Linear``'s own ``F.linear``); one with a parameter of another module is
recorded. Nothing is recorded with gradients disabled or while ``torch.compile`` traces; under
saved-tensor hooks (non-reentrant ``torch.utils.checkpoint``, whose backward recomputes the
segment without the capture) only the calls that run their own operations: :mod:`fimfast.recompute`.

A transposed or reshaped view (or a slice) of a parameter is remembered when it is made; the
call that consumes it makes it again from the parameter, so the model's is left without a
consumer in the graph. Used anywhere else too, it adds an edge into the parameter that no call
declares: the engine's edge count sends the parameter to the generic path (as for ``p.sum()``
added to the logits, ``p[idx]``, ``F.linear(x, p.exp())``, every other use not listed).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fimfast import functional_derived as fder
from fimfast import functional_ops as fops
from fimfast import functional_stacked as fstk
from fimfast import recompute
from fimfast.functional_computed import record_elementwise, site_ids
from fimfast.functional_ops import _bind, _tuple
from fimfast.hooks import Call, Capture, Use, saved_tensor_hooks_active
from fimfast.rules import functional as frules
from fimfast.rules.base import UseKind, _usable
from fimfast.rules.embedding import bag_data

F = torch.nn.functional
Tensor = torch.Tensor


class FunctionalMode(TorchFunctionMode):
    """Records recognised functional calls on trainable parameters into ``cap`` (see the module
    docstring).

    Args:
        cap: the step's capture.
        sites: ``{key: Site}`` kept across steps, so that a call site is the same object in
            every step (the engine keys plans and direct taps by it).
        owners: ``{id(param): ids of the modules with a rule that hold it}``: calls with such a
            parameter inside those modules' forwards are theirs.
    """

    def __init__(self, cap: Capture, sites: dict, owners: dict[int, tuple[int, ...]]):
        super().__init__()
        self.cap, self.sites, self.owners = cap, sites, owners
        self.inside: Counter = Counter()  # modules with a rule whose forward is running
        self.seen: Counter = Counter()  # calls per (kind, parameters) in this forward
        # id(view) -> (ref, param, transposed, remake, chain, version): see view_of, remember
        self.views: dict[int, tuple] = {}
        self.made: dict[int, tuple] = {}  # id -> (ref, param, chain): fder.remake_attributes
        self.stacked: dict[int, tuple] = {}  # id -> (ref, param, e, version): fstk.select
        self.swapped: list[list | None] = []  # per running module forward, attributes to put back
        self.recorded = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None or not self.capturing():  # under a checkpoint: fimfast.recompute
            if handler is not None and recompute.hooked():
                return recompute.functional(self, func, args, kwargs)
            return func(*args, **kwargs)
        return handler(self, func, args, kwargs)

    # -- state ----------------------------------------------------------------------------- #
    def capturing(self) -> bool:
        # is_compiling first: a constant while dynamo traces this mode, nothing else is traced
        return (
            not torch.compiler.is_compiling()
            and self.cap.active
            and torch.is_grad_enabled()
            and not saved_tensor_hooks_active()
        )

    def enter(self, module: torch.nn.Module, args: Any) -> None:
        self.inside[id(module)] += 1
        swapped = fder.remake_attributes(self, module) if self.views and self.capturing() else None
        self.swapped.append(swapped)

    def exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.inside[id(module)] -= 1
        swapped = self.swapped.pop() if self.swapped else None
        for name, t in swapped or ():
            setattr(module, name, t)

    def derived(self, t: Any) -> tuple | None:
        """``(param, chain)`` of a tensor made for a module's forward in this forward
        (``chain``: ``ds/dparam``, ``None`` for the parameter in another tensor): see
        :func:`fimfast.functional_derived.remake_attributes`."""
        v = self.made.get(id(t)) if isinstance(t, Tensor) else None
        if v is None or v[0]() is not t or id(v[1]) not in self.cap.param_ids:
            return None
        return v[1], v[2]

    def param(self, t: Any) -> torch.Tensor | None:
        """``t`` if it is a trainable parameter no running module with a rule holds."""
        if not isinstance(t, Tensor) or id(t) not in self.cap.param_ids:
            return None
        if any(self.inside[m] for m in self.owners.get(id(t), ())):
            return None
        return t

    def view_of(self, t: Any) -> tuple | None:
        """``(param, transposed, remake, chain)`` of a view of a parameter, or of an elementwise
        function of one, made in this forward: ``remake()`` makes the same tensor again from the
        parameter; ``chain`` (``None`` for a view) is its derivative with respect to the
        parameter, elementwise, shaped like the parameter (detached). A tensor modified in place
        since is not one (the call uses it as it is: an edge no call declares)."""
        if not isinstance(t, Tensor):
            return None
        v = self.views.get(id(t))
        if v is None or v[0]() is not t or self.param(v[1]) is None or t._version != v[5]:
            return None
        return v[1:5]

    def operand(self, t: Any) -> tuple | None:
        """``(param, remake, chain)`` of a parameter (``remake`` ``None``), of a reshaped view of
        one or of an elementwise function of one (see :meth:`view_of`); ``None`` for anything
        else (a transpose would reorder the elements)."""
        p = self.param(t)
        if p is not None:
            return p, None, None
        v = self.view_of(t)
        if v is None or v[1]:
            return None
        return v[0], v[2], v[3]

    def remember(
        self, out: Tensor, p: Tensor, transposed: bool, remake: Callable[[], Tensor],
        chain: Tensor | None = None,
    ) -> None:
        """Remember ``out``, a tensor made from parameter ``p`` (see :meth:`view_of`)."""
        self.views[id(out)] = (weakref.ref(out), p, transposed, remake, chain, out._version)

    # -- recording ------------------------------------------------------------------------- #
    def record(
        self, name: str, rule: Any, y: Any, lead: int, uses: list[Use], data: dict,
        batch_first: bool = False,
    ) -> Any:
        """Tap ``y`` and record the call at its site; ``y`` itself when it cannot be recorded
        (no graph, no leading dims: its parameters then take the generic path)."""
        if not _usable(y) or lead < 1:
            return y
        site = fstk.site_of(self, (name, site_ids(self.cap, uses)), name)
        tap, out = self.cap.tap(y, lead=lead, key=(id(site), 0), batch_first=batch_first)
        self.cap.record(Call(site, rule, [tap], uses, data))
        self.recorded += 1
        return out


@contextmanager
def capturing(
    cap: Capture, targets: list[tuple[torch.nn.Module, Any]], sites: dict, owners: dict
) -> Iterator[FunctionalMode]:
    """Run the body under a :class:`FunctionalMode` recording into ``cap``; ``targets`` are the
    modules with a rule (their forwards are tracked, see :meth:`FunctionalMode.param`)."""
    mode = FunctionalMode(cap, sites, owners)
    handles = []
    try:
        for m, _ in targets:
            handles.append(m.register_forward_pre_hook(mode.enter))
            handles.append(m.register_forward_hook(mode.exit, always_call=True))
        cap.derived = mode.derived
        with mode:
            yield mode
    finally:
        cap.derived = None
        for h in handles:
            h.remove()


def owners_of(targets: list[tuple[torch.nn.Module, Any]]) -> dict[int, tuple[int, ...]]:
    """``{id(param): ids of the modules of targets whose parameters (recursively) include it}``."""
    out: dict[int, tuple[int, ...]] = {}
    for m, _ in targets:
        for p in m.parameters():
            out[id(p)] = (*out.get(id(p), ()), id(m))
    return out


# --------------------------------------------------------------------------------------------- #
# handlers: each returns the call's result, recorded when it fits
# --------------------------------------------------------------------------------------------- #
def _linear(mode: FunctionalMode, func, args, kwargs):
    b = _bind(args, kwargs, ("input", "weight", "bias"), (None, None, None))
    if b is None:
        return func(*args, **kwargs)
    x, w, bias = b
    pw, view = mode.param(w), None
    if pw is None:  # F.linear(x, W.t()): W stored (I, O); F.linear(x, W * mask)
        found = _weight(mode, w) if isinstance(w, Tensor) and w.dim() == 2 else None
        if found is not None:
            pw, view = found
            w = view[2]()
    pb, bchain = fder.bias_of(mode, bias)
    if (pw is None and pb is None) or not isinstance(x, Tensor) or not isinstance(w, Tensor):
        return func(*args, **kwargs)
    if bchain is not None:  # F.linear(x, W, torch.tanh(b)): b's Vec times d tanh(b) / db
        bias, bchain = bchain[0](), bchain[1]
    y = func(x, w, bias)
    uses = [Use(p, UseKind.VEC, chain=bchain) for p in (pb,) if p is not None]
    if pw is not None and w.dim() == 2:
        uses.insert(0, fder.outer_use(pw, view, False))
    if not uses:
        return y
    return fstk.record(mode, "F.linear", y, x, uses)  # on routed or folded rows too


_weight = fder.weight_of  # (param, view or None) of a 2-D parameter or of its transpose


def _matmul(mode: FunctionalMode, func, args, kwargs):
    if kwargs or len(args) != 2 or not all(isinstance(a, Tensor) for a in args):
        return func(*args, **kwargs)
    x, w = args
    if x.dim() >= 2 and w.dim() >= 2 and max(x.dim(), w.dim()) >= 3:
        y = fops.batched_matmul(mode, func, x, w)  # None: a 2-D weight, a linear map below
        if y is not None:
            return y
    found = _weight(mode, w) if x.dim() >= 2 else None
    if found is None:
        if w.dim() >= 2 and mode.operand(w) is None:  # W @ x
            found = _weight(mode, x)
        if found is None:
            return func(*args, **kwargs)
        return _left_matmul(mode, func, found, w)
    p, view = found
    y = func(x, view[2]() if view is not None else p)
    use = fder.outer_use(p, view, True)  # x @ W: W stored (I, O)
    return mode.record("matmul", frules.LINEAR, y, y.dim() - 1, [use], {"x": x.detach()})


def _left_matmul(mode: FunctionalMode, func, found: tuple, x: Tensor) -> Tensor:
    """``W @ x`` (``W`` ``(O, I)``, ``x`` ``(..., I, K)``): ``(W @ x)^T = x^T W^T`` is a linear
    map of ``x^T`` with weight ``W``; the tap is on the transposed output, whose leading dims
    (those of ``x``, then ``K``) hold the batch (``K`` too for a 2-D ``x`` ``(I, N)``)."""
    p, view = found
    y = func(view[2]() if view is not None else p, x)
    use = fder.outer_use(p, view, False)  # W.t() @ x: W stored (I, O)
    yt = y.mT
    out = mode.record("left matmul", frules.LINEAR, yt, yt.dim() - 1, [use],
                      {"x": x.detach().mT})
    return out.mT


_EMB_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
             "sparse")


def _embedding(mode: FunctionalMode, func, args, kwargs):
    b = _bind(args, kwargs, _EMB_ARGS, (None, None, None, None, 2.0, False, False))
    y = func(*args, **kwargs)
    if b is None or b[5] or not isinstance(b[0], Tensor):
        return y
    ids, w, pi = b[0], mode.param(b[1]), b[2]
    if w is None or w.dim() != 2:
        return y
    if pi is not None and pi < 0:
        pi += w.shape[0]
    ids, y = fops.expand_shared(mode.cap, ids, y)
    data = {"ids": ids.detach(), "padding_idx": pi}
    return mode.record("F.embedding", frules.EMBEDDING, y, y.dim() - 1, [Use(w, UseKind.ROWS)],
                       data)


_BAG_ARGS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode",
             "sparse", "per_sample_weights", "include_last_offset", "padding_idx")


def _embedding_bag(mode: FunctionalMode, func, args, kwargs):
    b = _bind(args, kwargs, _BAG_ARGS, (None,) * 4 + (2.0, False, "mean", False, None, False, None))
    y = func(*args, **kwargs)
    if b is None or b[5] or not isinstance(b[0], Tensor) or b[0].is_floating_point():
        return y
    w, pi = mode.param(b[1]), b[10]
    if w is None or w.dim() != 2 or not isinstance(y, Tensor) or not _usable(y):
        return y
    if pi is not None and pi < 0:
        pi += w.shape[0]
    cfg = SimpleNamespace(weight=w, mode=b[6], padding_idx=pi, include_last_offset=bool(b[9]))
    data = bag_data(mode.cap, cfg, b[0], b[2], b[8], y)
    if data is None:
        return y
    return mode.record("F.embedding_bag", frules.EMBEDDING_BAG, y, 1, [Use(w, UseKind.ROWS)],
                       data, batch_first=True)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv(mode: FunctionalMode, func, args, kwargs):
    b = _bind(args, kwargs, _CONV_ARGS, (None, None, None, 1, 0, 1, 1))
    if b is None:
        return func(*args, **kwargs)
    x, w, bias, stride, padding, dilation, groups = b
    nsp = _CONV_DIMS[func]
    pw, view = mode.param(w), None
    if pw is None and isinstance(w, Tensor):  # F.conv2d(x, W * mask)
        view = mode.view_of(w)
        if view is not None and not view[1] and tuple(w.shape) == tuple(view[0].shape):
            pw = view[0]
        else:
            view = None
    pb, bchain = fder.bias_of(mode, bias)  # a parameter or an elementwise function of one
    ps = [p for p in (pw, pb) if p is not None]
    if (
        not ps or not isinstance(x, Tensor) or not isinstance(w, Tensor)
        or x.dim() != nsp + 2 or w.dim() != nsp + 2
    ):
        return func(*args, **kwargs)  # an unbatched input has no sample dimension
    if view is not None:  # the call consumes the function of W made again
        args, kwargs = fder.with_arg(args, kwargs, _CONV_ARGS, "weight", view[2]())
    if bchain is not None:
        args, kwargs = fder.with_arg(args, kwargs, _CONV_ARGS, "bias", bchain[0]())
    y = func(*args, **kwargs)
    kernel = tuple(w.shape[2:])
    dilation = _tuple(dilation, nsp)
    data = {
        "x": x.detach(), "kernel": kernel, "stride": _tuple(stride, nsp),
        "padding": frules.conv_padding(padding, kernel, dilation), "dilation": dilation,
        "groups": int(groups),
    }
    chain = None if view is None else view[3]
    uses = [
        Use(p, UseKind.OUTER, groups=int(groups), chain=chain) if p is pw
        else Use(p, UseKind.VEC, chain=None if bchain is None else bchain[1]) for p in ps
    ]
    return mode.record(f"F.conv{nsp}d", frules.CONV, y, 1, uses, data, batch_first=True)


def _view(mode: FunctionalMode, func, args, kwargs):
    """Remember a view of a parameter (transposed, or reshaped in its element order), or a
    reshaped view of an elementwise function of one."""
    out = func(*args, **kwargs)
    base = mode.operand(args[0]) if args else None
    if base is None or not isinstance(out, Tensor):
        return out
    p, remake, chain = base
    rest = args[1:]
    transposed = func in _TRANSPOSES
    if transposed:
        if remake is not None or p.dim() != 2 or (
            func in (Tensor.transpose, torch.transpose)
            and {int(a) % 2 for a in args[1:3]} != {0, 1}
        ):
            return out
    elif out.numel() != p.numel() or out.dtype != p.dtype:
        return out
    src = remake or (lambda: p)
    mode.remember(out, p, transposed, lambda: func(src(), *rest, **kwargs), chain)
    return out


def _elementwise(mode: FunctionalMode, func, args, kwargs):
    if kwargs or len(args) != 2:
        return func(*args, **kwargs)
    if not all(isinstance(a, Tensor) for a in args):  # p * 2, 1 + p, c / p: a function of p
        return fder.scalar_op(mode, func, args, _OPS[func])
    found = [mode.operand(a) for a in args]
    if (found[0] is None) == (found[1] is None):
        return func(*args, **kwargs)  # no parameter, or two
    pos = 0 if found[0] is not None else 1
    x = args[1 - pos]
    if fder.constant(mode, x, args[pos]):
        return fder.tensor_op(mode, func, args, _OPS[func], pos, found[pos])  # p * mask
    p, remake, chain = found[pos]
    pv = remake() if remake is not None else p
    y = func(*((pv, x) if pos == 0 else (x, pv)))
    op = _OPS[func]
    if not isinstance(y, Tensor) or not y.is_floating_point():
        return y
    return record_elementwise(mode, op, y, x, pv, pos, p, chain)


_TRANSPOSES = {Tensor.t, torch.t, Tensor.T.__get__, Tensor.mT.__get__, Tensor.transpose,
               torch.transpose}
_RESHAPES = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.unsqueeze, torch.unsqueeze,
             Tensor.view_as, Tensor.reshape_as}
_OPS: dict[Callable, str] = {}
for _op, _fs in {
    "mul": (Tensor.mul, torch.mul, Tensor.__mul__, Tensor.__rmul__),
    "div": (Tensor.div, torch.div, Tensor.__truediv__, Tensor.true_divide, torch.true_divide),
    "add": (Tensor.add, torch.add, Tensor.__add__, Tensor.__radd__),
    "sub": (Tensor.sub, torch.sub, Tensor.__sub__),
}.items():
    _OPS.update(dict.fromkeys(_fs, _op))

_CONV_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_HANDLERS: dict[Callable, Callable] = {
    F.linear: _linear,
    F.embedding: _embedding,
    F.embedding_bag: _embedding_bag,
    torch.conv1d: _conv,
    torch.conv2d: _conv,
    torch.conv3d: _conv,
    torch.matmul: _matmul,
    Tensor.matmul: _matmul,
    Tensor.__matmul__: _matmul,
    **dict.fromkeys(_TRANSPOSES | _RESHAPES, _view),
    **dict.fromkeys(_OPS, _elementwise),
    **fops.HANDLERS,
}
