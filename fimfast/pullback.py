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
against 13 ms. A weight made by ``torch._weight_norm``
(``parametrizations.weight_norm``, the older ``weight_norm`` hook) takes its closed form instead
(:func:`_weight_norm`; :func:`projected` without per-unit gradients at all, as for
``parametrizations.spectral_norm``).
"""

from __future__ import annotations

import time

import torch

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
        if projected(pb, parts, acc, params):
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
        closed = _weight_norm(W, Ds[j], thetas)
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


def _weight_norm(W: torch.Tensor, D: torch.Tensor, thetas: list) -> list | None:
    """Closed form of the pullback through ``W = torch._weight_norm(v, g, dim)``
    (``WeightNormInterfaceBackward``): with ``v^_i = v_i / |v_i|`` (the slices along ``dim``),
    ``grad g_i = <D_i, v^_i>`` and ``grad v_i = (g_i / |v_i|) (D_i - grad g_i v^_i)``
    (docs/math.md §4); ``None`` for any other ``W``."""
    found = weight_norm_of(W)
    if found is None:
        return None
    v, g, keep = found
    red = tuple(d + 1 for d in range(v.dim()) if d not in keep)
    dt = D.dtype
    vd, gd = v.detach().to(dt), g.detach().to(dt).reshape([1 if d not in keep else v.shape[d]
                                                           for d in range(v.dim())])
    norm = vd.square().sum([d - 1 for d in red], keepdim=True).sqrt()
    vhat = vd / norm
    dg = (D * vhat).sum(red, keepdim=True)  # (K, 1.. g's dims ..1)
    dv = (gd / norm) * (D - dg * vhat)
    out = []
    for t in thetas:
        out.append(dv if t is v else dg.reshape(D.shape[0], *g.shape) if t is g else None)
    return out


def weight_norm_of(W: torch.Tensor) -> tuple | None:
    """``(v, g, keep)`` of ``W = torch._weight_norm(v, g, dim)`` (``keep``: ``[dim]``, or ``[]``
    for the norm of the whole tensor); ``None`` for any other ``W``."""
    fn = W.grad_fn
    if type(fn).__name__ != "WeightNormInterfaceBackward0":
        return None
    (nv, _), (ng, _) = fn.next_functions[:2]
    v, g = getattr(nv, "variable", None), getattr(ng, "variable", None)
    if v is None or g is None or v.shape != W.shape:
        return None
    keep = [d for d in range(v.dim()) if g.dim() == v.dim() and g.shape[d] == v.shape[d] > 1]
    if len(keep) > 1 or g.numel() != (v.shape[keep[0]] if keep else 1):
        return None
    return v, g, keep


def _form(W: torch.Tensor, origin, dt: torch.dtype) -> tuple | None:
    """``(v, g, C, B, alpha, rows)`` of a weight whose pullback is ``alpha (D - beta B)`` with
    ``beta = <D, C>`` per row (``rows``) or over the whole tensor, ``D`` a gradient of ``W``
    as ``(O, I)``: ``torch._weight_norm`` (``C = B = v^``, ``alpha = g / |v|``, ``beta`` the
    gradient of ``g``) or ``parametrizations.spectral_norm`` of a weight of two or more dims
    along dim 0 (``W = v / sigma``, ``sigma = u^T v v'`` with the power iteration's vectors
    ``u``, ``v'`` fixed: ``C = W``, ``B = u v'^T``, ``alpha = 1 / sigma``; ``g`` ``None``);
    ``None`` for any other ``W``."""
    found = weight_norm_of(W)
    if found is not None:
        v, g, keep = found
        if keep not in ([0], []):
            return None
        vd = v.detach().reshape(v.shape[0], -1).to(dt)
        norm = (vd.square().sum(1, keepdim=True) if keep else vd.square().sum().reshape(1, 1))
        norm = norm.sqrt()
        vhat = vd / norm
        return v, g, vhat, vhat, g.detach().to(dt).reshape(-1, 1) / norm, bool(keep)
    from torch.nn.utils.parametrizations import _SpectralNorm

    if origin is None or len(origin) != 1 or not isinstance(origin[0], _SpectralNorm):
        return None
    sn, v = origin[0], origin.original
    if sn.dim != 0 or W.dim() < 2 or v.shape != W.shape:
        return None
    u, r = sn._u, sn._v
    sigma = torch.vdot(u, torch.mv(v.detach().reshape(v.shape[0], -1), r))
    saved = getattr(W.grad_fn, "_saved_other", None)  # the divisor of this forward
    if not isinstance(saved, torch.Tensor) or not torch.equal(saved.reshape(()), sigma):
        return None
    vm = v.detach().reshape(v.shape[0], -1).to(dt)
    u, r, sigma = u.to(dt), r.to(dt), sigma.to(dt)
    return v, None, vm / sigma, torch.outer(u, r), (1 / sigma).reshape(1, 1), False


def projected(pb, parts: dict, acc, params: list[torch.Tensor]) -> bool:
    """The squares of the parameters of a weight whose pullback is ``alpha (D - beta B)``
    (:func:`_form`: weight_norm, spectral_norm) and whose terms are :class:`~fimfast.rules.
    Outer` in ``W``'s layout, without forming per-unit gradients (docs/math.md §4, "Computed
    weights"). With ``D_u = sum_t P_ut (x) Q_nt``: ``beta_u = sum_t P_ut . S_nt`` (``S = Q
    C^T``, summed over the rows too for a whole-tensor ``beta``) and ``sum_u (alpha (D_u -
    beta_u B))^2 = alpha^2 (sum_u D_u^2 - 2 B sum_u beta_u D_u + B^2 sum_u beta_u^2)``, each
    sum one product over the samples; ``g`` (weight_norm) gets ``sum_u beta_u^2``. Returns
    ``False`` (nothing done) for any other case."""
    if len(pb.slots) != 1:
        return False
    (j, W), = pb.slots.items()
    terms = parts[j]
    if not terms or any(not isinstance(t, Outer) or t.P.dim() != 4 or t.index is not None
                        or u.transposed or g.block is not None for g, u, t in terms):
        return False
    pos = {id(params[i]): i for i in pb.thetas}
    dt = acc.dtypes[pb.thetas[0]]
    form = _form(W, (pb.origins or {}).get(j), dt)
    if form is None:
        return False
    v, g, C, B, alpha, rows = form
    O = C.shape[0]
    P = torch.cat([t.P for _, _, t in terms], 2) if len(terms) > 1 else terms[0][2].P
    Qs = [t.Q for _, _, t in terms]
    M, N = P.shape[:2]
    step = min([q.chunk for q in Qs if isinstance(q, Patches)] + [N])
    sq = X = b2 = None
    for n0 in range(0, N, step):
        Q = torch.cat([_piece(q, n0, n0 + step) for q in Qs], 1).to(dt)  # (n, T, I)
        Pn = P[:, n0 : n0 + step].to(dt)  # (M, n, T, O)
        beta = (Pn * (Q @ C.t())).sum(2)  # (M, n, O)
        if not rows:
            beta = beta.sum(-1, keepdim=True)
        R = (Pn * beta.unsqueeze(2)).sum(0)  # (n, T, O)
        x = R.reshape(-1, O).t() @ Q.reshape(-1, Q.shape[-1])
        if Pn.shape[2] == 1:  # no weight sharing: sum_m P^2 against Q^2, one product
            s = Pn[:, :, 0].square().sum(0).t() @ Q[:, 0].square()
        else:
            s = torch.einsum("mnto,nti->mnoi", Pn, Q).square().sum((0, 1))
        d2 = beta.square().sum((0, 1))
        sq, X, b2 = (s, x, d2) if sq is None else (sq.add_(s), X.add_(x), b2.add_(d2))
    b2 = b2.reshape(-1, 1) if rows else b2.sum()
    dv2 = alpha.square() * (sq - 2 * B * X + B.square() * b2)
    if id(v) in pos:
        acc.add(pos[id(v)], dv2.clamp_(min=0).reshape(v.shape))
    if g is not None and id(g) in pos:
        acc.add(pos[id(g)], b2.reshape(g.shape))
    return True


def _piece(Q, a: int, b: int) -> torch.Tensor:
    return Q[a:b] if isinstance(Q, Patches) else dense(Q)[a:b]
