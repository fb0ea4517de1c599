"""The per-sample gradients of parameters used through a computed weight ``W = f(theta)``
(:mod:`fimfast.derived_weights`), one chunk of backward columns at a time.

The rules give the per-unit gradients of ``W`` as terms (:class:`fimfast.rules.Outer`,
:class:`~fimfast.rules.Rows`, :class:`~fimfast.rules.Vec`); here they are formed in ``W``'s
layout for a few samples at a time (``(K, *W.shape)``, ``K`` (column, sample) units, as many as
the memory budget allows: :attr:`fimfast.derived_weights.Pullback.units`), pulled back through
``f``, ``grad_u theta = J_f^T grad_u W`` (docs/math.md §4), squared and added. The pullback is a
backward of ``f`` on the ``W`` of this forward (its graph kept), whatever ``f`` is (any
parametrization): one batched backward of all units (``is_grads_batched``, torch's legacy
batching) or one backward per unit, whichever was faster the first time a structure of ``f``
and units came (both are timed once, :data:`_WAYS`). Measured on CPU (1 thread, 144 units, once
warm): a gather by an index and a permute (a relative-position bias table of 49 x 4 entries)
2.2 ms batched against 9.1 ms one by one; a symmetric parametrization of a 128 x 128 weight 20
against 13 ms. A weight that normalizes its parameter per slice (``torch._weight_norm``:
``parametrizations.weight_norm``, the older ``weight_norm`` hook; ``F.normalize(v, dim=d)`` and
``v / v.norm(dim=d, keepdim=True)``: a cosine classifier) takes its closed form instead
(:func:`fimfast.pullback_closed.dense`; :func:`fimfast.pullback_closed.projected` without
per-unit gradients at all, as for ``parametrizations.spectral_norm``).
"""

from __future__ import annotations

import time

import torch

from fimfast import pullback_closed
from fimfast.dtypes import compute_dtype
from fimfast.rules.base import Outer, Patches, Rows, Vec, dense


def chunk(pullbacks: list, gmap: dict, acc, params: list[torch.Tensor]) -> None:
    """Add the squared per-unit gradients of the pulled parameters for one chunk of columns
    (``gmap``: the tap gradients of the chunk, by handle id) into ``acc``."""
    for pb in pullbacks:
        terms: dict[int, list] = {}
        parts: dict[int, list] = {j: [] for j in pb.slots}
        M = N = None
        for g in pb.groups:
            for c, ui in g.members:
                if id(c) not in terms:
                    terms[id(c)] = c.rule.terms(c, [gmap.get(id(t.handle)) for t in c.taps])
                term = terms[id(c)][ui]
                if term is not None:
                    parts[g.index].append((g, c.uses[ui], term))
                    M, N = _units(term)
        if M is None:
            continue
        if pullback_closed.projected(pb, parts, acc, params):
            continue
        thetas = [params[i] for i in pb.thetas]
        step = max(1, pb.units // M)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            Ds = {j: _dense(parts[j], W, n0, n1) for j, W in pb.slots.items()}
            grads = _pull(pb.slots, Ds, thetas)
            for i, gr in zip(pb.thetas, grads):
                if gr is not None:
                    acc.add(i, gr.to(acc.dtypes[i]).square().sum(0))


def finish(pullbacks: list, acc, params: list[torch.Tensor]) -> None:
    """After the last chunk of a step: the squares the closed forms summed over the chunks
    (:func:`fimfast.pullback_closed.finish`)."""
    pullback_closed.finish(pullbacks, acc, params)


def _units(term) -> tuple[int, int]:
    """``(M, N)``: columns and samples of a term."""
    if isinstance(term, Outer):
        return term.P.shape[0], term.P.shape[1]
    if isinstance(term, Rows):
        return term.Qe.shape[0], term.Qe.shape[1]
    return term.V.shape[0], term.V.shape[1]


def _dense(parts: list, W: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """The gradients of ``W`` of samples ``n0:n1`` for every column, ``(M (n1 - n0), *W.shape)``,
    from the terms ``parts`` (``(group, use, term)``), in the compute dtype of ``W``."""
    dt = compute_dtype(W.dtype)
    out = None
    for g, use, term in parts:
        D = _term_dense(term, use, n0, n1, dt)  # (M, n, *block)
        if out is None:
            out = D.new_zeros(D.shape[0], n1 - n0, *W.shape)
        view = out if g.block is None else out[:, :, g.block[0] : g.block[1]]
        view.add_(D.reshape(view.shape))
    if out is None:
        raise RuntimeError("a computed weight got no term from its layers")
    return out.reshape(-1, *W.shape)


def _term_dense(term, use, n0: int, n1: int, dt: torch.dtype) -> torch.Tensor:
    """One term of samples ``n0:n1`` in the layout of its parameter (block): ``(M, n, ...)``."""
    if isinstance(term, Vec):
        return term.V[:, n0:n1].to(dt)
    if isinstance(term, Rows):
        return _rows_dense(term, use, n0, n1, dt)
    P = term.P[:, n0:n1].to(dt)
    Q = term.Q[n0:n1] if isinstance(term.Q, Patches) else dense(term.Q)[n0:n1]
    Q = Q.to(dt)
    if P.dim() == 4:
        per = torch.einsum("mnto,nti->mnoi", P, Q)
        if use.transposed:
            per = per.transpose(-2, -1)
    else:  # groups: (M, n, T, g, O/g) and (n, T, g, I/g) -> (M, n, O, I/g)
        per = torch.einsum("mntgo,ntgi->mngoi", P, Q)
        per = per.reshape(per.shape[0], per.shape[1], -1, per.shape[-1])
    if term.index is None:
        return per
    M, n = per.shape[:2]
    full = per.new_zeros(M, n, use.param[use.block[0]:use.block[1]].numel()
                         if use.block else use.param.numel())
    full.index_add_(2, term.index.reshape(-1), per.reshape(M, n, -1))
    return full


def _rows_dense(term: Rows, use, n0: int, n1: int, dt: torch.dtype) -> torch.Tensor:
    """A table's per-unit gradients ``(M, n, V, d)``: the rows of ``Qe`` added at their ids."""
    Qe = term.Qe[:, n0:n1].to(dt)
    ids = term.ids[n0:n1]
    if term.keep is not None:
        Qe = Qe * term.keep[n0:n1].unsqueeze(-1).to(dt)
    M, n, S, d = Qe.shape
    V = use.param.shape[0] if use.block is None else use.block[1] - use.block[0]
    full = Qe.new_zeros(M, n * V, d)
    at = (torch.arange(n, device=ids.device).unsqueeze(1) * V + ids).reshape(-1)
    full.index_add_(1, at, Qe.reshape(M, n * S, d))
    return full.view(M, n, V, d)


def _pull(Ws: dict[int, torch.Tensor], Ds: dict[int, torch.Tensor], thetas: list) -> list:
    """``J_f^T D`` of every unit, summed over the weights: one ``(K, *theta.shape)`` (or
    ``None``) per parameter."""
    if len(Ws) == 1:
        (j, W), = Ws.items()
        closed = pullback_closed.dense(W, Ds[j], thetas)
        if closed is not None:
            return closed
    outs = list(Ws.values())
    grads = [Ds[j].to(W.dtype) for j, W in Ws.items()]
    key = (_signature(outs), tuple(grads[0].shape))
    way = _WAYS.get(key)
    if way is None:  # the first time: both ways, timed; the faster one from then on
        t0 = time.process_time()
        out = _batched(outs, thetas, grads)
        t1 = time.process_time()
        if out is not None:
            _looped(outs, thetas, grads)
        t2 = time.process_time()
        if len(_WAYS) > 256:
            _WAYS.clear()
        _WAYS[key] = "batched" if out is not None and t1 - t0 <= t2 - t1 else "loop"
        if out is not None:
            return out
    elif way == "batched":
        out = _batched(outs, thetas, grads)
        if out is not None:
            return out
    return _looped(outs, thetas, grads)


# how each structure of computed weights is pulled back fastest (see _pull): by signature
_WAYS: dict[tuple, str] = {}


def _signature(outs: list[torch.Tensor]) -> tuple:
    """The operations of the graphs of ``outs`` (up to 64 nodes) and their shapes."""
    sig, seen, stack = [], set(), [w.grad_fn for w in outs]
    while stack and len(sig) < 64:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        sig.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return (*sig, *(tuple(w.shape) for w in outs))


def _batched(outs, thetas, grads) -> list | None:
    """One batched backward of ``f`` (``None`` where an operation has no batching rule)."""
    try:
        return list(torch.autograd.grad(outs, thetas, grads, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True))
    except RuntimeError:
        return None


def _looped(outs, thetas, grads) -> list:
    """One backward of ``f`` per unit."""
    K = grads[0].shape[0]
    rows = [torch.autograd.grad(outs, thetas, [g[k] for g in grads], retain_graph=True,
                                allow_unused=True) for k in range(K)]
    return [None if rows[0][i] is None else torch.stack([r[i] for r in rows])
            for i in range(len(thetas))]
