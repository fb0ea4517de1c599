"""Closed forms of the pullback through a weight that normalizes its parameter per unit
(:mod:`fimfast.pullback`, docs/math.md §4 "Computed weights").

* ``W = torch._weight_norm(v, g, dim)`` (``parametrizations.weight_norm``, the older
  ``weight_norm`` hook): ``W_i = g_i v_i / |v_i|`` over the slices ``i`` kept by ``dim``;
* ``W = F.normalize(v, p=2, dim=d)``, or the same written by hand, ``v / v.norm(dim=d,
  keepdim=True)`` (``torch.linalg.vector_norm`` too, ``.clamp(min=eps)`` or ``.clamp_min(eps)``
  on the norms, ``d`` one dim, several or all): weight norm with ``g = 1`` and no ``g``
  parameter, the slices those left by the reduced dims. Where a norm is at or below the clamp's
  ``eps`` (the clamp's derivative differs) it is not recognized: the general pullback, exact;
* ``parametrizations.spectral_norm`` along dim 0 (:func:`form` only).

Their pullback of a gradient ``D`` of ``W`` is ``alpha (D - beta B)`` with ``beta = <D, C>`` per
slice: :func:`dense` applies it to per-unit gradients (in place of a backward of ``f``) and
:func:`projected` adds the squares of the parameters without per-unit gradients at all, from
:class:`~fimfast.rules.Outer` terms: per row, per column or over the whole weight read as
``(O, I)``, ``x @ W`` (a weight stored ``(I, O)``) included.
"""

from __future__ import annotations

import torch

from fimfast.rules.base import Outer, Patches
from fimfast.rules.base import dense as dense_factor

_ACC = torch._C._functions.AccumulateGrad
_CLAMPS = ("ClampMinBackward0", "ClampBackward1")


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


def normalized_of(W: torch.Tensor) -> tuple | None:
    """``(v, norms, red)`` of ``W = v / max(|v|, eps)`` with ``v`` a parameter and ``|v|`` its
    2-norms over the dims ``red`` (sorted; ``norms`` shaped to broadcast against ``v``): the
    graph of ``F.normalize(v, dim=d)`` or of ``v / v.norm(dim=d, keepdim=True)``, with or without
    a clamp of the norms from below (no clamp from above), every norm above the clamp; ``None``
    for any other ``W``."""
    fn = W.grad_fn
    if type(fn).__name__ != "DivBackward0" or len(fn.next_functions) != 2:
        return None
    (na, _), (node, _) = fn.next_functions
    v = getattr(na, "variable", None) if type(na) is _ACC else None
    if v is None or v.shape != W.shape or not v.is_floating_point():
        return None
    if type(node).__name__ == "ExpandBackward0":
        node = node.next_functions[0][0]
    eps = None
    if type(node).__name__ in _CLAMPS:
        eps = getattr(node, "_saved_min", None)
        if not isinstance(eps, (int, float)) or getattr(node, "_saved_max", None) is not None:
            return None
        node = node.next_functions[0][0]
    if (type(node).__name__ != "LinalgVectorNormBackward0" or node._saved_ord != 2
            or getattr(node.next_functions[0][0], "variable", None) is not v):
        return None
    k = v.dim()
    dims = node._saved_dim
    red = tuple(range(k)) if dims is None or len(dims) == 0 else tuple(sorted(
        {(d - 2 ** 64 if d >= 2 ** 63 else d) % k for d in dims}))
    if not node._saved_keepdim and len(red) != k:
        return None  # the norms broadcast against v some other way
    try:
        fn._saved_self  # noqa: B018 (raises where v was modified in place since)
        norms = node._saved_result.detach()
    except RuntimeError:
        return None
    if not bool((norms > (0 if eps is None else eps)).all()):
        return None  # a clamped norm: the general pullback
    shape = [1 if d in red else v.shape[d] for d in range(k)]
    return v, norms.reshape(shape), red


def unit_form(W: torch.Tensor) -> tuple | None:
    """``(v, g, vhat, scale, red)``: ``W = scale |v| vhat`` with ``vhat = v / |v|`` per slice
    (the 2-norms over the dims ``red``), ``scale = g / |v|`` (weight norm) or ``1 / |v|``
    (a normalized weight, ``g`` ``None``), shaped to broadcast against ``v``; ``None`` for any
    other ``W``."""
    found = weight_norm_of(W)
    if found is not None:
        v, g, keep = found
        red = tuple(d for d in range(v.dim()) if d not in keep)
        vd = v.detach()
        norms = vd.square().sum(red, keepdim=True).sqrt() if red else vd.abs()
        shape = [1 if d in red else v.shape[d] for d in range(v.dim())]
        return v, g, vd / norms, g.detach().reshape(shape) / norms, red
    found = normalized_of(W)
    if found is None:
        return None
    v, norms, red = found
    return v, None, v.detach() / norms, 1 / norms, red


def dense(W: torch.Tensor, D: torch.Tensor, thetas: list) -> list | None:
    """The pullback of per-unit gradients ``D`` (``(K, *W.shape)``) through a weight of
    :func:`unit_form`: ``grad g = <D, vhat>`` per slice and ``grad v = scale (D - grad g
    vhat)``, one ``(K, *theta.shape)`` (or ``None``) per parameter of ``thetas``; ``None`` for
    any other ``W``."""
    found = unit_form(W)
    if found is None:
        return None
    v, g, vhat, scale, red = found
    dt = D.dtype
    vhat, scale = vhat.to(dt), scale.to(dt)
    beta = (D * vhat).sum(tuple(d + 1 for d in red), keepdim=True) if red else D * vhat
    dv = scale * (D - beta * vhat)
    return [dv if t is v else beta.reshape(D.shape[0], *g.shape) if g is not None and t is g
            else None for t in thetas]


def _axis(k: int, red: tuple, transposed: bool) -> str | None:
    """How the slices of a ``k``-dim weight normalized over the dims ``red`` read in the
    ``(O, I)`` layout of its terms (``transposed``: stored ``(I, O)``): ``rows``, ``cols``,
    ``whole``, or ``None``."""
    if len(red) == k:
        return "whole"
    if transposed:
        return None if k != 2 else "rows" if red == (0,) else "cols"
    return "rows" if red == tuple(range(1, k)) else "cols" if red == (0,) else None


def _as_layout(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    t = t.reshape(1, 1) if t.dim() == 0 else t.reshape(t.shape[0], -1)
    return t.t() if transposed else t


def form(W: torch.Tensor, origin, dt: torch.dtype, transposed: bool = False) -> tuple | None:
    """``(v, g, C, B, alpha, axis)`` of a weight whose pullback is ``alpha (D - beta B)`` with
    ``beta = <D, C>`` per row, per column or over the whole tensor (``axis``), all in the
    ``(O, I)`` layout of its terms (``transposed``: ``W`` stored ``(I, O)``; ``D`` a gradient of
    ``W`` in that layout): a weight of :func:`unit_form` (``C = B = vhat``, ``alpha = scale``,
    ``beta`` the gradient of ``g``) or ``parametrizations.spectral_norm`` of a weight of two or
    more dims along dim 0 (``W = v / sigma``, ``sigma = u^T v v'`` with the power iteration's
    vectors ``u``, ``v'`` fixed: ``C = W``, ``B = u v'^T``, ``alpha = 1 / sigma``; ``g``
    ``None``); ``None`` for any other ``W``."""
    if W.dim() < 2 or (transposed and W.dim() != 2):
        return None
    found = unit_form(W)
    if found is not None:
        v, g, vhat, scale, red = found
        axis = _axis(v.dim(), red, transposed)
        if axis is None:
            return None
        C = _as_layout(vhat.to(dt), transposed)
        return v, g, C, C, _as_layout(scale.to(dt), transposed), axis
    from torch.nn.utils.parametrizations import _SpectralNorm

    if origin is None or len(origin) != 1 or not isinstance(origin[0], _SpectralNorm):
        return None
    sn, v = origin[0], origin.original
    if sn.dim != 0 or v.shape != W.shape:
        return None
    u, r = sn._u, sn._v
    sigma = torch.vdot(u, torch.mv(v.detach().reshape(v.shape[0], -1), r))
    saved = getattr(W.grad_fn, "_saved_other", None)  # the divisor of this forward
    if not isinstance(saved, torch.Tensor) or not torch.equal(saved.reshape(()), sigma):
        return None
    vm = v.detach().reshape(v.shape[0], -1).to(dt)
    u, r, sigma = u.to(dt), r.to(dt), sigma.to(dt)
    C, B = _as_layout(vm / sigma, transposed), _as_layout(torch.outer(u, r), transposed)
    return v, None, C, B, (1 / sigma).reshape(1, 1), "whole"


def closed(W: torch.Tensor, uses: list, origin) -> bool:
    """Whether :func:`projected` takes a weight ``W`` used by ``uses``: every use an ``outer``
    use of the whole weight without groups, all stored alike, and ``W`` of :func:`form`."""
    from fimfast.rules.base import UseKind

    if not uses or any(u.kind != UseKind.OUTER or u.groups != 1 or u.block is not None
                       or u.transposed != uses[0].transposed for u in uses):
        return False
    return form(W, origin, W.dtype, uses[0].transposed) is not None


def projected(pb, parts: dict, acc, params: list[torch.Tensor]) -> bool:
    """Add one chunk of columns to the sums of a weight whose pullback is ``alpha (D - beta B)``
    (:func:`form`) and whose terms are :class:`~fimfast.rules.Outer` of the whole weight, all
    stored alike, without forming per-unit gradients (docs/math.md §4, "Computed weights");
    :func:`finish` turns them into the squares of the parameters once every chunk came. With
    ``D_u = sum_t P_ut (x) Q_nt``: per row ``beta_u = sum_t P_ut . S_nt`` (``S = Q C^T``, summed
    over the rows too for a whole-tensor ``beta``), per column ``beta_u = sum_t Q_nt . (P_ut
    C)``, and ``sum_u (alpha (D_u - beta_u B))^2 = alpha^2 (sum_u D_u^2 - 2 B sum_u beta_u D_u +
    B^2 sum_u beta_u^2)``, each sum one product over the samples; ``g`` (weight_norm) gets
    ``sum_u beta_u^2``. Returns ``False`` (nothing done) for any other case."""
    if len(pb.slots) != 1:
        return False
    (j, W), = pb.slots.items()
    terms = parts[j]
    if not terms or any(not isinstance(t, Outer) or t.P.dim() != 4 or t.index is not None
                        or g.block is not None or u.transposed != terms[0][1].transposed
                        for g, u, t in terms):
        return False
    P = torch.cat([t.P for _, _, t in terms], 2) if len(terms) > 1 else terms[0][2].P
    st = pb.closed
    if st is None:  # the first chunk of the step
        dt = acc.dtypes[pb.thetas[0]]
        transposed = terms[0][1].transposed
        found = form(W, (pb.origins or {}).get(j), dt, transposed)
        if found is None:
            return False
        st = pb.closed = _Sums(found, transposed, [t.Q for _, _, t in terms], P.shape, dt)
    st.add(P, pb.units)
    return True


def finish(pullbacks: list, acc, params: list[torch.Tensor]) -> None:
    """Add the squares of the parameters of every pullback that :func:`projected` summed in
    this step into ``acc``."""
    for pb in pullbacks:
        st, pb.closed = pb.closed, None
        if st is None:
            continue
        pos = {id(params[i]): i for i in pb.thetas}
        sq, X, b2 = st.result()
        dv2 = st.alpha.square() * (sq - 2 * st.B * X + st.B.square() * b2)
        if id(st.v) in pos:
            dv2 = dv2.clamp_(min=0)
            acc.add(pos[id(st.v)], (dv2.t() if st.transposed else dv2).reshape(st.v.shape))
        if st.g is not None and id(st.g) in pos:
            acc.add(pos[id(st.g)], b2.reshape(st.g.shape))


class _Sums:
    """The sums of :func:`projected` over the chunks of one step: per sample ``R = sum_m P_u
    beta_u`` (per row or whole) and, without weight sharing, ``sum_m P_u^2``, whose products
    with ``Q`` are taken once at the end (:meth:`result`); per column ``sum_u beta_u D_u``
    chunk by chunk; ``sum_u beta_u^2``."""

    def __init__(self, found: tuple, transposed: bool, Qs: list, shape: tuple, dt) -> None:
        self.v, self.g, self.C, self.B, self.alpha, self.axis = found
        self.transposed, self.Qs, self.dt = transposed, Qs, dt
        _, N, T, O = shape
        I = self.C.shape[1]  # noqa: E741
        self.patch = min([q.chunk for q in Qs if isinstance(q, Patches)] + [N])
        size = I if self.axis == "cols" else O if self.axis == "rows" else 1
        self.b2 = torch.zeros(size, dtype=dt, device=self.C.device)
        self.sq = self.p2 = self.R = self.S = self.X = None
        if T == 1:
            self.p2 = self.b2.new_zeros(N, O)
        else:
            self.sq = self.b2.new_zeros(O, I)
        if self.axis == "cols":
            self.X = self.b2.new_zeros(O, I)
        else:
            self.R = self.b2.new_zeros(N, T, O)
            self.S = torch.cat([self.Q(n0, n0 + self.patch) @ self.C.t()
                                for n0 in range(0, N, self.patch)])  # (N, T, O)

    def Q(self, a: int, b: int) -> torch.Tensor:
        """The input factors of the samples ``a:b``, ``(n, T, I)``."""
        return torch.cat([_piece(q, a, b) for q in self.Qs], 1).to(self.dt)

    def add(self, P: torch.Tensor, units: int) -> None:
        """One chunk of columns, ``P`` ``(M, N, T, O)``, a few samples at a time (a
        convolution's patches; with weight sharing, where the per-unit products are formed, at
        most ``units`` (column, sample) pairs)."""
        M, N, T, O = P.shape
        step = self.patch if T == 1 else min(self.patch, max(1, units // M))
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            Pn = P[:, n0:n1].to(self.dt)  # (M, n, T, O)
            Q = self.Q(n0, n1) if self.axis == "cols" or T > 1 else None  # (n, T, I)
            if self.axis == "cols":
                beta = (Pn @ self.C * Q).sum(2)  # (M, n, I)
                self.X.addmm_(Pn.reshape(-1, O).t(),
                              (Q * beta.unsqueeze(2)).reshape(-1, Q.shape[-1]))
            else:
                beta = (Pn * self.S[n0:n1]).sum(2)  # (M, n, O)
                if self.axis == "whole":
                    beta = beta.sum(-1, keepdim=True)
                self.R[n0:n1] += (Pn * beta.unsqueeze(2)).sum(0)
            if T == 1:
                self.p2[n0:n1] += Pn[:, :, 0].square().sum(0)
            else:
                self.sq += torch.einsum("mnto,nti->mnoi", Pn, Q).square().sum((0, 1))
            self.b2 += beta.square().sum((0, 1))

    def result(self) -> tuple:
        """``(sum_u D_u^2, sum_u beta_u D_u, sum_u beta_u^2)``, the last shaped ``(O, 1)``,
        ``(1, I)`` or ``()`` by the axis."""
        sq, X = self.sq, self.X
        if sq is None or X is None:
            N = self.p2.shape[0] if self.p2 is not None else self.R.shape[0]
            for n0 in range(0, N, self.patch):
                Q = self.Q(n0, n0 + self.patch)
                if self.p2 is not None:
                    s = self.p2[n0 : n0 + self.patch].t() @ Q[:, 0].square()
                    sq = s if n0 == 0 else sq.add_(s)
                if self.R is not None:
                    R = self.R[n0 : n0 + self.patch]
                    x = R.reshape(-1, R.shape[-1]).t() @ Q.reshape(-1, Q.shape[-1])
                    X = x if n0 == 0 else X.add_(x)
        b2 = self.b2
        b2 = b2.reshape(1, -1) if self.axis == "cols" else b2.reshape(-1, 1) \
            if self.axis == "rows" else b2.sum()
        return sq, X, b2


def _piece(Q, a: int, b: int) -> torch.Tensor:
    return Q[a:b] if isinstance(Q, Patches) else dense_factor(Q)[a:b]
