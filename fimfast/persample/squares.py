"""Squaring and summing the terms of one group, one chunk of columns at a time.

The rules write each parameter's per-unit gradients as terms (:class:`fimfast.rules.Outer`,
:class:`~fimfast.rules.Rows`, :class:`~fimfast.rules.Vec`); here they are added up over the uses
of a group and squared per sample with the fused ops (:func:`fimfast.ops.sq_matmul`,
:func:`fimfast.ops.shared_sq`), never forming per-row gradients of the whole model. A layer
without weight sharing defers its square to the end of the step (:func:`finish`):
``sum_n S_n (x) a_n^2`` with ``S_n`` the sum over all columns of the squared output gradients.
"""

from __future__ import annotations

import torch

from fimfast import layers, ops
from fimfast.batch_sums import Sums
from fimfast.dtypes import compute_dtype
from fimfast.persample.plan import Group, GroupKind, RowIndex
from fimfast.rules.base import Patches, dense
from fimfast.rules.conv_grouped import GroupedInput
from fimfast.rules.linear import LinearRule
from fimfast.rules.windows import Windows

_LINEAR_TERMS = LinearRule.terms  # the rule whose terms linear_lane forms directly
_LANE_KINDS = (GroupKind.OUTER, GroupKind.VEC)


def _weight_sq(g: Group, G: torch.Tensor, A: torch.Tensor, backend) -> torch.Tensor:
    """``sq_matmul(G, A)`` laid out as ``g``'s weight: ``(O, I)``, or ``(I, O)`` for a weight
    stored transposed (Hugging Face ``Conv1D``)."""
    a, b = (A, G) if g.transposed else (G, A)
    return ops.sq_matmul(a, b, backend=backend)


def linear_lane(g: Group, gmap: dict, acc: Sums, lanes: dict, sq: dict | None = None) -> bool:
    """The squares of a group whose one member is a weight or bias of ``nn.Linear`` (or Hugging
    Face ``Conv1D``) without weight sharing, for one chunk of columns, straight from the output
    gradient ``G`` ``(M, N, O)``, without forming the rule's terms (a few ops and 30-100 us of
    Python per layer and chunk); the same arithmetic as :class:`~fimfast.rules.LinearRule`'s
    terms squared by :func:`accumulate`. Returns ``False`` (nothing done) for any other case.

    The weight adds ``sum_m G_m^2`` into the group's ``S`` in place (no temporary after the
    first chunk) and records itself in ``lanes`` (by call); a single column in all is kept for
    the state to fold already squared where it folds (``G^2`` shared with the bias through
    ``sq``, one dict per chunk: :func:`_shared_square`), else as it came (:meth:`Sums.defer`,
    else as :func:`_defer_outer` keeps it). The bias of a call whose weight is in ``lanes`` adds
    nothing now: :func:`finish` reads ``sum_n S_n`` once (the bias gradient of a layer without
    weight sharing is its output gradient); otherwise it adds ``sum_{m,n} G^2``. Lane or not is
    structural (rule, tap layout, a gradient that arrives), so every chunk of a step takes the
    same path; call with the weights first."""
    c, ui = g.members[0]
    if type(c.rule).terms is not _LINEAR_TERMS or g.kind not in _LANE_KINDS:
        return False
    tap = c.taps[0]
    G = gmap.get(id(tap.handle))
    if G is None or tap.lead != 1 or tap.bdim != 0:
        return False
    st = g.state
    dt = acc.dtypes[g.index]
    if g.kind == GroupKind.VEC:
        w = lanes.get(id(c))
        if w is not None and st.partner is not False:
            st.partner = w
            return True
        if st.partner:  # the weight left the lane: a partial S would be counted twice
            raise RuntimeError(f"the bias of {c.module} lost its weight's squares")
        st.partner = False
        G2 = _shared_square(G, dt, sq, True) if G.shape[0] == 1 else G.to(dt).square().sum(0)
        acc.add(g.index, G2.sum(0), g.block)
        return True
    if st.single:  # one column in all
        if st.S is not None or G.shape[0] != 1:
            return False
        x = c.data["x"]
        if acc.fold and acc.defer(g.index, _shared_square(G, dt, sq, True), x, g.block,
                                  g.transposed, squared=True):
            return True
        if not acc.defer(g.index, G[0], x, g.block, g.transposed):  # sq_matmul squares it
            st.S, st.root, st.Q = G[0], True, x
        return True
    if st.root:
        return False
    st.S = _sum_sq(G, dt, st.S)
    if st.Q is None:
        st.Q = c.data["x"]
    lanes[id(c)] = g
    return True


def _shared_square(
    G: torch.Tensor, dt: torch.dtype, sq: dict | None, column: bool = False
) -> torch.Tensor:
    """``G^2`` in ``dt`` (``G[0]^2`` for a ``column`` ``G`` of shape ``(1, ...)``), a fresh
    tensor, formed once per chunk for every group that asks for it with the same ``sq`` (the
    entry holds ``G``, so no other tensor can take its address)."""
    key = None if sq is None else (_key(G), column, dt)
    hit = None if key is None else sq.get(key)
    if hit is None:
        hit = (G, (G[0] if column else G).to(dt).square())
        if key is not None:
            sq[key] = hit
    return hit[1]


def head_closed_form(groups: list[Group], rows, cols, acc: Sums, backend) -> None:
    """The logits layer in closed form, no backward column: ``F_W = S^T a^2`` with
    ``S = sum_k u_k^2`` per row (:meth:`Columns.squares`, once for the weight and the bias),
    ``F_b = sum_r S_r``."""
    for g in groups:
        if g.kind == GroupKind.HEAD_W:
            c, _ = g.members[0]
            x = c.data["x"]
            A = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            if not rows.all_valid:
                A = A.index_select(0, rows.index)
            dt = acc.dtypes[g.index]
            if acc.fold and acc.defer(g.index, cols.squares(dt), A, None,
                                      g.transposed, squared=True):
                continue
            if not acc.defer(g.index, cols.root, A, None, g.transposed):
                acc.add(g.index, _weight_sq(g, cols.root, A, backend))
        elif g.kind == GroupKind.HEAD_B:
            acc.add(g.index, cols.squares(acc.dtypes[g.index]).sum(0))


def finish(groups: list[Group], acc: Sums, backend) -> None:
    """The deferred squares of layers without weight sharing: ``sum_n S_n (x) a_n^2`` once for
    all columns (kept for the state to fold where ``acc`` allows it: :meth:`Sums.defer`)."""
    for g in groups:
        st = g.state
        if st.partner:  # the bias of a Linear layer: sum_n S_n of its weight (linear_lane)
            acc.add(g.index, st.partner.state.S.sum(0), g.block)
    for g in groups:
        st = g.state
        if st.S is not None:
            S, Q = st.S, st.Q
            if acc.defer(g.index, S, Q, g.block, g.transposed, squared=not st.root):
                continue
            if st.root:  # one column, as it came: sq_matmul squares both sides
                acc.add(g.index, _weight_sq(g, S, Q, backend), g.block)
            else:
                Q2 = Q.to(S.dtype).square()
                acc.add(g.index, Q2.t() @ S if g.transposed else S.t() @ Q2, g.block)


def _block(a: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    return a if block is None else a[block[0] : block[1]]


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _colsq(P: torch.Tensor, dt: torch.dtype, cache: dict) -> torch.Tensor:
    """``sum_m P[m]^2`` (``P`` ``(M, N, ...)``), computed once per chunk for a weight and its
    bias (the bias gradient of a layer without weight sharing is its output gradient)."""
    k = _key(P)
    if k not in cache:
        # the entry keeps P alive, so no other tensor of the chunk can reuse its address
        cache[k] = (P, _sum_sq(P, dt))
    return cache[k][1]


def _sum_sq(P: torch.Tensor, dt: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_m P[m]^2`` in ``dt``, added into ``out`` in place when given. A few columns are
    added one by one into one output, with no ``P``-sized squared temporary (3-8x faster on
    fresh memory); many by square + sum (``torch.linalg.vector_norm`` over dim 0 is 10-40x
    slower than either). On an accelerator, where one launch per column costs more than the
    temporary, always square + sum."""
    M = P.shape[0]
    if M > 32 or P.device.type != "cpu":
        s = P.to(dt).square().sum(0)
        return s if out is None else out.add_(s)
    first = 0
    if out is None:
        out, first = P[0].to(dt).square(), 1
    for m in range(first, M):
        Pm = P[m].to(dt)
        out.addcmul_(Pm, Pm)
    return out


def accumulate(g: Group, parts: list, sums: Sums, backend, cache: dict) -> None:
    """Add the squares of one chunk's terms ``parts`` of group ``g`` into ``sums`` (or into the
    group's deferred state); ``cache`` holds this chunk's ``sum_m P[m]^2`` by tensor."""
    dt = sums.dtypes[g.index]
    if g.kind == GroupKind.VEC:
        sums.add(g.index, _vec_sq(parts, dt, cache), g.block)
        return
    outers = [p for p in parts if isinstance(p, layers.Outer)]
    rows = [p for p in parts if isinstance(p, layers.Rows)]
    if any(o.index is not None for o in outers):
        if rows:
            raise TypeError("an Outer term with an index cannot share its parameter with Rows")
        _indexed(g, outers, sums, backend)
    elif outers:
        if len(g.members) == 1 and outers[0].P.dim() == 4 and outers[0].P.shape[2] == 1:
            _defer_outer(g, outers[0], dt, cache)
        else:
            P, Q = _cat_outer(g, outers)
            sq = _outer_sq(P, Q, backend)
            sums.add(g.index, sq.transpose(-2, -1) if g.transposed else sq, g.block)
    if rows:
        ids, keep, Qe = _cat_rows(g, rows)
        if not outers and g.block is None:  # the rows as they are (Sums.add_rows)
            _rows_sq(g, ids, keep, Qe, None, sums)
            return
        view = _block(sums.get(g.index), g.block)
        _rows_sq(g, ids, keep, Qe, view)
        if outers:
            _tied_cross(g, outers, ids, keep, Qe, view, dt)


def _vec_sq(parts: list, dt: torch.dtype, cache: dict) -> torch.Tensor:
    """``sum_{m,n}`` of the squared sum of the :class:`Vec` terms."""
    if len(parts) == 1:
        V = parts[0].V
        hit = cache.get(_key(V))  # a bias whose weight already squared the same gradients
        return hit[1].sum(0) if hit is not None else V.to(dt).square().sum((0, 1))
    V = parts[0].V.to(dt)
    for p in parts[1:]:
        V = V + p.V.to(dt)
    return V.square().sum((0, 1))


def _defer_outer(g: Group, outer, dt: torch.dtype, cache: dict) -> None:
    """No weight sharing: defer, ``S_n`` = sum over columns of ``g_n^2``, and ``S^T a^2`` once at
    the end (:func:`finish`); a single column is passed as it is (sq_matmul squares it). The
    chunk's cache entry may become ``S`` itself: the cache is dropped before the next chunk adds
    to it."""
    P = outer.P[:, :, 0]
    st = g.state
    if st.S is not None:
        st.S.add_(_colsq(P, dt, cache))
    elif P.shape[0] == 1 and st.single:
        st.S, st.root = P[0], True
    else:
        st.S = _colsq(P, dt, cache)
    if st.Q is None:
        st.Q = dense(outer.Q)[:, 0]


def _tied_cross(g: Group, outers: list, ids, keep, Qe, view: torch.Tensor, dt) -> None:
    """Tied table: ``2 sum_units E_u . D_u`` on the rows the embedding touched."""
    P, Q = _cat_outer(g, outers)
    M, N, T, V = P.shape
    S = ids.shape[1]
    Pg = torch.gather(P, 3, ids.view(1, N, 1, S).expand(M, N, T, S))  # (M, N, T, S)
    D = torch.einsum("mnts,nti->mnsi", Pg.to(dt), dense(Q).to(dt))
    X = (Qe.to(dt) * D).sum(0)  # (N, S, d)
    if keep is not None:
        X = X * keep.unsqueeze(-1)
    view.index_add_(0, ids.reshape(-1), 2.0 * X.reshape(-1, X.shape[-1]))


def _cat_outer(g: Group, outers: list) -> tuple[torch.Tensor, torch.Tensor]:
    if len(outers) == 1:
        return outers[0].P, outers[0].Q
    P = torch.cat([o.P for o in outers], dim=2)  # a GroupedInput as its patches: dense()
    if g.state.Qcat is None:  # the input side is the same for every chunk
        g.state.Qcat = torch.cat([dense(o.Q) for o in outers], dim=1)
    return P, g.state.Qcat


# per-sample squared products are formed this many bytes at a time (cache-sized, see _outer_sq)
_SQ_CHUNK_BYTES = 2 * 2**20


def _steps(Q: torch.Tensor | Patches, step: int) -> int:
    """Samples per piece: ``step``, at most ``Q.chunk`` for :class:`Patches`, at least 1."""
    return max(1, min(step, Q.chunk) if isinstance(Q, Patches) else step)


def _outer_sq(P: torch.Tensor, Q: torch.Tensor | Patches, backend=None) -> torch.Tensor:
    """``sum_{m,n} (P[m, n]^T Q[n])^2``: ``(O, I)`` or ``(g, O/g, I/g)`` for groups. A
    :class:`~fimfast.rules.base.Patches` ``Q`` is formed ``Q.chunk`` samples at a time (at most),
    each piece once for all the columns."""
    I = Q.shape[-1]
    if isinstance(Q, Windows) and Q.by_taps:
        return _windows_sq(P, Q, backend)
    if isinstance(Q, GroupedInput):  # a backward per column, no patches
        return Q.sq(P)
    if P.dim() == 4:
        M, N, T, O = P.shape
        out = None
        if M > 1 and T > 1 and P.stride(2) == 1:
            return _stacked_sq(P, Q, backend)
        if M == 1 or O >= 64 or I < 64:
            # one column at a time over the whole batch, P as it came (no copy; the kernels
            # chunk the samples). Measured against the stacked layout below, 1 thread: 14 vs 22
            # ms (conv 16 x 25, 576 positions, 10 columns), 3.7 vs 5.8 ms (in_proj 192 x 64, 4)
            patches = isinstance(Q, Patches)  # formed by slices
            step = Q.chunk if patches else N
            for n0 in range(0, N, step):
                whole = n0 == 0 and step >= N and not patches  # the whole batch: no slices
                Qn = Q if whole else Q[n0 : n0 + step]
                for m in range(M):
                    Pn = P[m] if whole else P[m, n0 : n0 + step]
                    part = ops.shared_sq(Pn, Qn, backend=backend)
                    out = part if out is None else out.add_(part)
            return out
        # few outputs, many inputs (conv 32 x 400, 10 columns: 30 vs 36 ms for the loop): the
        # M columns side by side, shared_sq of (n, T, M*O) against (n, T, I), a few samples at
        # a time so that the stacked copy and the per-sample (M*O, I) products stay cache-sized
        step = _steps(Q, _SQ_CHUNK_BYTES // max(1, 4 * M * O * max(I, T)))
        for n0 in range(0, N, step):
            Pm = P[:, n0 : n0 + step].permute(1, 2, 0, 3).reshape(-1, T, M * O)
            part = ops.shared_sq(Pm, Q[n0 : n0 + step], backend=backend)
            out = part if out is None else out.add_(part)
        return out.reshape(M, O, I).sum(0)
    M, N, L, G, O = P.shape
    dt = compute_dtype(P.dtype, Q.dtype)  # float32, float64 when either is
    out = torch.zeros(G, O, I, dtype=dt, device=P.device) if N == 0 else None
    step = _steps(Q, _SQ_CHUNK_BYTES // max(1, M * G * O * I * 4))
    for n0 in range(0, N, step):  # one product per (sample, group): (M O, L) @ (L, I)
        Pn, Qn, n = P[:, n0 : n0 + step].to(dt), Q[n0 : n0 + step].to(dt), min(step, N - n0)
        per = torch.bmm(Pn.permute(1, 3, 0, 4, 2).reshape(n * G, M * O, L),
                        Qn.permute(0, 2, 1, 3).reshape(n * G, L, I))
        part = per.view(n, G, M, O, I).square_().sum((0, 2))  # the first piece: the sum itself
        out = part if out is None else out.add_(part)
    return out


def _stacked_sq(P: torch.Tensor, Q: torch.Tensor | Patches, backend) -> torch.Tensor:
    """:func:`_outer_sq` of ``P`` ``(M, N, T, O)`` whose positions are its innermost dim (a
    convolution's output gradient, ``(M, N, O, T)`` in memory): the ``M`` columns side by side,
    ``(n, M O, T)`` by one copy of runs of ``T`` elements, against ``(n, T, I)`` in one product per
    sample, a few samples at a time (cache-sized). 1 thread, 16 samples, 3 and 9 columns, against
    one column at a time: ``Conv2d(16, 32, 3, stride=2)`` on 16 x 16 inputs 0.52 vs 0.64 ms and
    1.76 vs 2.19 ms; ``Conv2d(3, 16, 3)`` 0.27 vs 0.30 ms and 0.95 vs 1.37 ms."""
    M, N, T, O = P.shape
    I = Q.shape[-1]
    step = _steps(Q, _SQ_CHUNK_BYTES // max(1, 4 * M * O * max(I, T)))
    out = None
    for n0 in range(0, N, step):
        Pt = P[:, n0 : n0 + step].permute(1, 0, 3, 2).reshape(-1, M * O, T)
        part = ops.shared_sq(Pt.transpose(1, 2), Q[n0 : n0 + step], backend=backend)
        out = part if out is None else out.add_(part)
    return out.view(M, O, I).sum(0)


def _windows_sq(P: torch.Tensor, Q: Windows, backend) -> torch.Tensor:
    """``sum_{m,n} (P[m, n]^T Q[n])^2`` for :class:`~fimfast.rules.windows.Windows` ``Q``, one
    kernel tap of the first spatial dim at a time (the entries of the taps are disjoint), each
    tap's strided view read by the product as it is: ``(O, I prod(kernel))`` laid out as the
    weight ``(O, I, k_0, k_1, ...)``."""
    O, I, k0 = P.shape[-1], Q.channels, Q.taps
    out = None
    for j in range(k0):
        Qj = Q.tap(j)
        part = ops.shared_sq(P[0], Qj, backend=backend)
        for m in range(1, P.shape[0]):
            part.add_(ops.shared_sq(P[m], Qj, backend=backend))
        if out is None:
            out = part.new_empty(O, I, k0, part.shape[1] // I)
        out[:, :, j] = part.view(O, I, -1)
    return out.view(O, -1)


def _indexed(g: Group, outers: list, sums: Sums, backend) -> None:
    """Outer terms of which some place their products by index (:class:`fimfast.rules.Outer`):
    the terms with equal indices add up (along ``T``) before the square; products of disjoint
    indices are squared apart and added at their entries. Where indices overlap without being
    equal, the per-unit gradients are formed in the parameter's layout, added and squared."""
    view = _block(sums.get(g.index), g.block).view(-1)
    classes: list[tuple[torch.Tensor, list]] = []
    for o in outers:
        ix = o.index
        if ix is None:  # laid out as the parameter
            ix = torch.arange(view.numel(), device=view.device)
        ix = ix.reshape(-1)
        for c in classes:
            if c[0] is ix or (c[0].shape == ix.shape and torch.equal(c[0], ix)):
                c[1].append(o)
                break
        else:
            classes.append((ix, [o]))
    if len(classes) > 1:
        hits = torch.zeros_like(view, dtype=torch.int32)
        for ix, _ in classes:
            hits.index_add_(0, ix, torch.ones_like(ix, dtype=torch.int32))
        if int(hits.max()) > 1:
            _indexed_dense(classes, view)
            return
    for ix, os in classes:
        if len(os) == 1:
            P, Q = os[0].P, os[0].Q
        else:
            P = torch.cat([o.P for o in os], dim=2)
            Q = torch.cat([dense(o.Q) for o in os], dim=1)
        view.index_add_(0, ix, _outer_sq(P, Q, backend).reshape(-1).to(view.dtype))


def _indexed_dense(classes: list, view: torch.Tensor) -> None:
    """Overlapping indices: the per-unit gradients ``(M, N, numel)`` in the parameter's layout,
    added over the terms, then squared."""
    dt = view.dtype
    full = None
    for ix, os in classes:
        for o in os:
            P, Q = o.P.to(dt), dense(o.Q).to(dt)
            if P.dim() == 4:
                per = torch.einsum("mnto,nti->mnoi", P, Q)
            else:
                per = torch.einsum("mntgo,ntgi->mngoi", P, Q)
            per = per.reshape(per.shape[0], per.shape[1], -1)
            if full is None:
                full = per.new_zeros(per.shape[0], per.shape[1], view.numel())
            full.index_add_(2, ix, per)
    view.add_(full.square().sum((0, 1)))


def _cat_rows(g: Group, rows: list):
    if len(rows) == 1:
        r = rows[0]
        return r.ids, r.keep, r.Qe
    ids = torch.cat([r.ids for r in rows], dim=1)
    if all(r.keep is None for r in rows):
        keep = None
    else:
        keep = torch.cat(
            [torch.ones_like(r.ids, dtype=torch.bool) if r.keep is None else r.keep for r in rows],
            dim=1,
        )
    return ids, keep, torch.cat([r.Qe for r in rows], dim=2)


def _rows_sq(g: Group, ids, keep, Qe, view: torch.Tensor | None, sums: Sums | None = None):
    """``sum_units`` of the squared per-unit segment sums of ``Qe`` by id, into rows of ``view``
    (or, without, into the rows of ``g``'s slot of ``sums``, kept as rows)."""
    M, N, S, d = Qe.shape
    if g.state.rows is None:  # once per step: the distinct (sample, id) pairs
        V = view.shape[0] if view is not None else sums.shapes[g.index][0]
        keys = (torch.arange(0, N * V, V, device=ids.device).unsqueeze(1) + ids).reshape(-1)
        if keep is not None:  # the positions that do not count: one key past every pair
            keys = keys.masked_fill(~keep.reshape(-1), N * V)
        uniq, inv = torch.unique(keys, return_inverse=True)
        n = uniq.numel()
        U = n - 1 if keep is not None and int(uniq[-1]) == N * V else n
        g.state.rows = RowIndex(inv, uniq[:U] % V, U, n)
    inv, rid, U, n = g.state.rows
    dt = view.dtype if view is not None else sums.dtypes[g.index]
    seg = torch.zeros(M, n, d, dtype=dt, device=Qe.device)
    # repeated ids of one sample add before the square; the last segment (if n > U) is dropped
    seg.index_add_(1, inv, Qe.reshape(M, N * S, d).to(dt))
    sq = seg[0, :U].square_() if M == 1 else seg[:, :U].square().sum(0)
    if view is None:
        sums.add_rows(g.index, rid, sq)
    else:
        view.index_add_(0, rid, sq)
