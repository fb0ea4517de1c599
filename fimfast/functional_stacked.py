"""Stacked experts: ``F.linear(x, W[e], b[e])`` on a slice of a stacked parameter.

Mixture-of-experts models store their experts' weights stacked, ``W`` ``(E, O, I)`` (and a bias
``b`` ``(E, O)``), and call expert ``e`` as ``F.linear(x, W[e])`` on the rows routed to it
(Hugging Face's ``MixtralExperts``, ``Qwen2MoeExperts``, ``OlmoeExperts``, ... with
``experts_implementation="eager"``). While :class:`fimfast.functional.FunctionalMode` records:

* :func:`select` remembers each slice of a trainable parameter on its first dim by an integer
  (``W[e]``, ``W.select(0, e)``, ``e`` a Python int or a 0-dim integer tensor) and where it came
  from, as the mode remembers the views of a parameter (:meth:`FunctionalMode.remember`);
* :func:`linear`: an ``F.linear`` whose weight (2-D) or bias (1-D) is such a slice, the other a
  parameter, a slice or nothing, makes the slices again from their parameters and records the
  call with a ``Use`` of each parameter limited to its slice, ``block=(e, e + 1)`` of its first
  dim: the squares of the slice accumulate into slice ``e`` of the parameter's estimate.

The call is recorded on routed rows when its input was gathered from the batch
(:func:`fimfast.rules.routed.rows_of`: ``hidden_states[token_idx]``), else with the batch folded
into its first dim unfolded (``(N * T, I)`` tokens, :func:`fimfast.rules.linear.folded`), else
as any ``F.linear`` (:func:`record`, which the plain ``F.linear`` handlers use too: a router
``F.linear(h.reshape(-1, d), W)`` on a bare parameter, an expert on a 2-D parameter). The
independence probe checks the rows' samples as for every routed layer.

The plan adds the uses of one slice (one ``block``) before the square (a slice used twice in
one forward, as a tied weight) and refuses overlapping blocks (``W`` used whole by another
recognised call too: generic path). The slice the model made is left without a consumer; any
other use of it or of ``W`` (``W[e].sum()``, ``W[e, :k]``, ``W[:, 0]``, ``x @ W[e]``) adds an
edge into ``W`` that no call declares, and the engine's edge count sends ``W`` to the generic
path (or the pullback of a weight computed from parameters), exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from fimfast import functional_computed as fcomp
from fimfast.functional_computed import site_ids
from fimfast.functional_derived import _bind
from fimfast.hooks import Call, Use
from fimfast.rules import fold_rows, routed
from fimfast.rules import functional as frules
from fimfast.rules.base import UseKind, _usable
from fimfast.rules.linear import folded

F = torch.nn.functional
Tensor = torch.Tensor
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _index(e: Any) -> int | None:
    """``e`` as an int when it is a Python int or a 0-dim integer tensor, else ``None`` (on an
    accelerator, reading it waits for the device, as the loop over ``expert_hit`` already
    does for each expert)."""
    if isinstance(e, int) and not isinstance(e, bool):
        return e
    if isinstance(e, Tensor) and e.dim() == 0 and e.dtype in _INTS:
        return int(e)
    return None


def select(mode, func, args, kwargs):
    """``W[e]`` / ``W.select(0, e)`` of a trainable parameter: remembered (module docstring)."""
    out = func(*args, **kwargs)
    if kwargs or not args or not isinstance(out, Tensor):
        return out
    p = mode.param(args[0])
    if p is None or p.dim() < 2:
        return out
    if func is Tensor.__getitem__:
        e = _index(args[1]) if len(args) == 2 else None
    elif len(args) == 3 and args[1] in (0, -p.dim()):
        e = _index(args[2])
    else:
        e = None
    if e is None or not -p.shape[0] <= e < p.shape[0]:
        return out
    mode.stacked[id(out)] = (weakref.ref(out), p, e % p.shape[0], out._version)
    return out


def slice_of(mode, t: Any) -> tuple[Tensor, int] | None:
    """``(param, e)`` of ``t = param[e]`` remembered by :func:`select` and not modified since."""
    v = mode.stacked.get(id(t))
    if v is None or v[0]() is not t or t._version != v[3] or mode.param(v[1]) is None:
        return None
    return v[1], v[2]


def linear(mode, func, args, kwargs, plain: Callable):
    """``F.linear`` with a slice for its weight or bias (module docstring); any other call goes
    to ``plain``, the usual handler."""
    b = _bind(args, kwargs, ("input", "weight", "bias"), (None, None, None))
    sw = slice_of(mode, b[1]) if b is not None else None
    sb = slice_of(mode, b[2]) if b is not None else None
    if sw is None and sb is None:
        return plain(mode, func, args, kwargs)
    x, w, bias = b
    pw = mode.param(w) if sw is None else sw[0]
    pb = mode.param(bias) if sb is None and bias is not None else (sb or (None,))[0]
    if (not isinstance(x, Tensor) or x.dim() < 2 or pw is None or w.dim() != 2
            or (bias is not None and (pb is None or bias.dim() != 1))):
        return plain(mode, func, args, kwargs)  # the model's slices: edges no call declares
    wt = pw if sw is None else pw[sw[1]]  # the slices made again: the model's are left alone
    bt = bias if sb is None else pb[sb[1]]
    y = func(x, wt, bt)
    uses = [Use(pw, UseKind.OUTER, block=None if sw is None else (sw[1], sw[1] + 1))]
    if bias is not None:
        uses.append(Use(pb, UseKind.VEC, block=None if sb is None else (sb[1], sb[1] + 1)))
    return record(mode, "F.linear", y, x, uses)


def site_of(mode, key: tuple, name: str) -> frules.Site:
    """The site of the ``k``-th call of ``key`` in this forward of the capture mode ``mode``
    (made at its first step; the cache cleared above 4096 sites), marked with the model's mode."""
    k = mode.seen[key]
    mode.seen[key] += 1
    site = mode.sites.get((key, k))
    if site is None:
        if len(mode.sites) > 4096:
            mode.sites.clear()
        site = mode.sites[(key, k)] = frules.Site(name)
    site.training = mode.cap.model.training
    return site


def record(mode, name: str, y: Any, x: Tensor, uses: list[Use]) -> Any:
    """Record ``y = F.linear(x, ...)`` with ``uses`` (a linear map of each row of ``x``) at its
    site: on routed rows, folded rows unfolded, or its usual layout (module docstring)."""
    if not _usable(y) or y.dim() < 2:
        return mode.record(name, frules.LINEAR, y, y.dim() - 1, uses, {"x": x.detach()})
    site = site_of(mode, (name, site_ids(mode.cap, uses), tuple(u.block for u in uses)), name)
    mode.recorded += 1
    cap = mode.cap
    rows = routed.rows_of(cap, x) if x.dim() == y.dim() else None
    if rows is not None:  # rows gathered from the batch (an expert's tokens)
        return routed.record(cap, site, frules.LINEAR, x, y, rows, uses, None, None)
    k = folded(cap.samples, y)
    yt, xt = (y.reshape(-1, k, *y.shape[1:]), x.reshape(-1, k, *x.shape[1:])) if k else (y, x)
    tap, out = cap.tap(yt, lead=yt.dim() - 1, key=(id(site), 0))
    cap.record(Call(site, frules.LINEAR, [tap], uses, {"x": xt.detach()}))
    if not k:
        return out
    out = out.flatten(0, 1)
    fold_rows.mark(cap, tap, x, out, cap.samples)  # rows folded by size only: refold
    return out


def _linear(mode, func, args, kwargs):
    return linear(mode, func, args, kwargs, fcomp.linear)  # (a weight computed from parameters)


HANDLERS: dict[Callable, Callable] = {
    **dict.fromkeys((Tensor.__getitem__, Tensor.select, torch.select), select),
    F.linear: _linear,
}
"""Handlers merged into :mod:`fimfast.functional`'s, after :mod:`fimfast.functional_ops`'."""
