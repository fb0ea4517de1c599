"""Per-layer sums of a Kronecker-family pass, for each layer kind of
:mod:`fimfast.structured.capture` (formulas: docs/structured.md, "KFAC", "EKFAC").

Inputs ``a`` come from :func:`~fimfast.structured.capture.inputs_of` and output gradients ``g``
``(M, N, T, O)`` (``M`` cotangents) from :func:`~fimfast.structured.capture.out_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fimfast.ops.gram import BLOCK, gram_upper_, mirror_upper_
from fimfast.rules.embedding import padding_idx
from fimfast.structured import gram
from fimfast.structured.convgram import conv_gram


@dataclass
class LayerSums:
    """Per-layer sums of one Kronecker-family pass (all plain sums, so the sums of two shards
    add up to the sums of their union)."""

    # input second moments (sum): (I', I') (upper block rows, see gram_into), (V,) or (D I', D I');
    # an embedding under reduce: sparse (N, V) rows (fimfast.structured.gram)
    A: torch.Tensor | None = None
    npos: float = 0.0  # positions (or samples, for reduce) summed into A
    G: torch.Tensor | None = None  # output-gradient second moments: (O, O) (as A)
    D: torch.Tensor | None = None  # (O, I') squared projected gradients (EKFAC, quasi-diag)
    cross: torch.Tensor | None = None  # (O, I) weight-bias cross terms (quasi-diag)
    # fields whose entries below the diagonal (see gram_into) are unspecified: read through
    # full_gram, which overwrites them, or zeroed by settle() before the sums leave the process
    unset: set = field(default_factory=set)

    FIELDS = ("A", "G", "D", "cross")

    @property
    def empty(self) -> bool:
        """Whether nothing was added yet."""
        return self.npos == 0.0 and self.A is None and self.G is None and self.D is None \
            and self.cross is None

    def clear(self) -> None:
        """Back to the empty sums."""
        for f in self.FIELDS:
            setattr(self, f, None)
        self.npos = 0.0
        self.unset.clear()

    def settle(self) -> None:
        """Zero the unspecified entries below the diagonal (before a state is saved or
        reduced)."""
        for name in self.unset:
            getattr(self, name).triu_()
        self.unset.clear()


# the upper triangle of a symmetric Gram matrix ``x^T x`` of more than _BLOCKED columns: summed in
# place into the running sum by :func:`fimfast.ops.gram.gram_upper_` (a symmetric rank-k update:
# MKL's where torch links it, half the products of a full ``x^T x``; else the upper block rows of
# BLOCK rows, 58% for 784 columns), the entries below the diagonal left unspecified, and
# :func:`full_gram` mirrors the triangle when read. Below, one full product (blocks are faster
# from about 200 columns on, one CPU thread, float32: 256 columns 0.094 against 0.112 ms for 128
# rows; 192 columns equal for 128 rows).
_BLOCKED = 192
# up to this many input entries (and _BLOCKED columns) a factor with the bias column is one product
# of [x, c] (the copy costs less than the five small operations of the bias column and corner)
_FUSED = 16384
# a convolution's G summed per pair with one batched product up to this many output channels
_BMM_MAX = 384


def gram_into(s: LayerSums, name: str, x: torch.Tensor, one: bool = False,
              c: torch.Tensor | None = None) -> None:
    """Add ``y^T y`` to the field ``name`` of ``s``, with ``y = x`` (``(rows, n)``) or, if
    ``one``, ``y = [x, c]`` (``c``: ``(rows,)``, all ones if ``None``) without forming ``y``: the
    last row and column are ``x^T c`` and ``c^T c`` (for a small ``x``, at most ``_FUSED``
    entries and ``_BLOCKED`` columns, ``y`` is formed and its product taken in one call). For
    ``n > _BLOCKED`` only the upper triangle of the ``x^T x`` part is summed; the entries below
    the diagonal are unspecified (``s.unset``, see :meth:`LayerSums.settle`): read the sum with
    :func:`full_gram`."""
    n = x.shape[1]
    out = getattr(s, name)
    first = out is None
    if one and n <= _BLOCKED and x.numel() <= _FUSED:  # [x, c] formed: one product, not six ops
        y = torch.cat([x, x.new_ones(x.shape[0], 1) if c is None else c.unsqueeze(1)], 1)
        if first:
            setattr(s, name, torch.mm(y.T, y))
        else:
            out.addmm_(y.T, y)
        return
    if first:  # every entry is written below (no zero fill of the whole matrix)
        out = x.new_empty(n + one, n + one)
        setattr(s, name, out)
    core = out[:n, :n] if one else out
    if n <= _BLOCKED:
        core.addmm_(x.T, x, beta=0 if first else 1)
    else:
        gram_upper_(core, x, not first)
        if first:
            s.unset.add(name)
    if one:  # the last column in place (mirrored to the last row where the sum is kept full)
        col = out[:n, n]
        if c is not None:
            col.addmv_(x.T, c, beta=0 if first else 1)
            cc = c @ c
        elif first:
            torch.sum(x, 0, out=col)
            cc = float(x.shape[0])
        else:
            col += x.sum(0)
            cc = float(x.shape[0])
        if n <= _BLOCKED:
            out[n, :n] = col
        if first:
            out[n, n] = cc
        else:
            out[n, n] += cc


def full_gram(m: torch.Tensor, inplace: bool = False, scale: float = 1.0) -> torch.Tensor:
    """The symmetric matrix of a sum kept by :func:`gram_into`, times ``scale`` (a new tensor
    unless ``inplace``): the upper triangle scaled and mirrored
    (:func:`fimfast.ops.gram.mirror_upper_`)."""
    n = m.shape[0]
    if n <= _BLOCKED:
        if scale == 1.0:
            return m if inplace else m.clone()
        return m.mul_(scale) if inplace else m * scale
    out = m if inplace else m.clone()
    mirror_upper_(out, scale)
    return out


class HalfGram:
    """A symmetric factor ``scale * S`` of a sum ``S`` kept by :func:`gram_into`, whose entries
    below the diagonal are unspecified: completed (scaled and mirrored, in place) only where a
    full matrix is read (:meth:`full`); its eigenpairs are taken from the upper triangle as it is
    (:meth:`eigh`). The mirror (:func:`fimfast.ops.gram.mirror_upper_`) is a transposed copy of
    half the matrix; the eigendecomposition, the way of ``solve`` and of EKFAC, never needs
    it."""

    __slots__ = ("m", "scale")
    is_sparse = False

    def __init__(self, m: torch.Tensor, scale: float):
        self.m, self.scale = m, scale

    shape = property(lambda self: self.m.shape)
    dtype = property(lambda self: self.m.dtype)
    device = property(lambda self: self.m.device)

    def full(self) -> torch.Tensor:
        """The symmetric matrix, in the buffer of the sum (which this object owns)."""
        return full_gram(self.m, True, self.scale)

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``torch.linalg.eigh`` of the (scaled) upper triangle, the same values as the completed
        matrix; ``None`` where float32 LAPACK fails (see
        :func:`fimfast.structured.factors.eigh`)."""
        if self.scale != 1.0:
            for i in range(0, self.m.shape[0], BLOCK):
                self.m[i:i + BLOCK, i:].mul_(self.scale)
            self.scale = 1.0
        try:
            lam, U = torch.linalg.eigh(self.m, UPLO="U")
        except torch.linalg.LinAlgError:
            return None
        if bool(torch.isfinite(lam).all()) and bool(torch.isfinite(U).all()):
            return lam, U
        return None


def half_gram(m: torch.Tensor, inplace: bool = False, scale: float = 1.0):
    """:func:`full_gram`, or a :class:`HalfGram` where the matrix is kept in upper block rows
    (``inplace=False``: of a copy)."""
    if m.shape[0] <= _BLOCKED:
        return full_gram(m, inplace, scale)
    return HalfGram(m if inplace else m.clone(), scale)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _add(s: LayerSums, name: str, value: torch.Tensor) -> None:
    old = getattr(s, name)
    if old is None:
        setattr(s, name, value)
    else:
        old.add_(value)


def add_inputs(layer, s: LayerSums, a: torch.Tensor, w: torch.Tensor | None, approx: str,
               dtype: torch.dtype, order: torch.Tensor | None = None) -> None:
    """Add the input second moments of one batch (``w``: ``(N, T)`` position weights; ``a``:
    the inputs of :func:`~fimfast.structured.capture.inputs_of` with ``ones=False``, the 1 of a
    Linear-kind layer's bias implicit; ``order``: ``a[..., order]`` is the layer's input order,
    see :func:`~fimfast.structured.capture.patch_order`)."""
    if layer.kind == "embedding":
        if approx == "reduce":  # sparse rows a_bar_n (fimfast.structured.gram)
            pad = padding_idx(layer.module)
            s.A = gram.append(s.A, gram.rows(a, w, layer.I, pad, dtype))
            s.npos += _samples(a, w)
            return None
        return _embedding_inputs(layer, s, a, w, dtype)
    if layer.kind == "layernorm" and approx == "expand":
        return _ln_expand(layer, s, a.to(dtype), w)
    bias = layer.bias is not None
    if layer.kind == "layernorm":  # (N, T, D I'): (x_hat_d, 1) of every feature, row-major
        a, bias = _ln_full(a.to(dtype), bias).flatten(2), False  # the 1s are in the rows
    else:
        a = a.to(dtype)
    if w is not None:
        w = w.to(dtype)
    if approx == "expand":  # 0/1 weights: sum w a a^T = (sqrt(w) a)^T (sqrt(w) a)
        npos = float(a.shape[0] * a.shape[1]) if w is None else float(w.sum())
        a2 = a.reshape(-1, a.shape[-1])
        sw = None if w is None else w.reshape(-1).sqrt()
        a2 = a2 if sw is None else a2 * sw.unsqueeze(1)
        if order is None:
            gram_into(s, "A", a2, bias, sw)
        else:
            _gram_reordered(s, a2, bias, sw, order)
    else:  # reduce: the mean input over the positions of each sample
        one = None
        if w is None:
            abar = a.mean(1)
        else:
            ww = w.reshape(w.shape + (1,) * (a.dim() - 2))
            abar = (a * ww).sum(1) / ww.sum(1).clamp_min(1)
            one = w.sum(1) / w.sum(1).clamp_min(1)  # the mean of the bias input 1
        npos = _samples(a, w)
        if order is None:
            gram_into(s, "A", abar, bias, one)
        else:
            _gram_reordered(s, abar, bias, one, order)
    s.npos += npos


def _samples(a: torch.Tensor, w: torch.Tensor | None) -> float:
    """``reduce``'s ``N``: the samples with a position of nonzero weight (one whose positions
    are all padding has no mean input and adds nothing, as under ``expand``; before, it was
    counted, scaling ``A`` by ``(N - 1) / N``)."""
    return float(a.shape[0]) if w is None else float((w.reshape(w.shape[0], -1) != 0).any(1).sum())


def _ln_expand(layer, s: LayerSums, xh: torch.Tensor, w: torch.Tensor | None) -> None:
    """LayerNorm, ``expand``: ``sum w vec(a) vec(a)^T`` for the ``(D, I')`` rows ``a = (x_hat_d,
    1)``, assembled from ``sum w x_hat x_hat^T``, ``sum w x_hat`` and ``sum w`` (a quarter of the
    products of the ``D I'``-column Gram matrix)."""
    D, In = xh.shape[-1], layer.In
    x = xh.reshape(-1, D)
    if w is None:
        n, m, xs = float(x.shape[0]), x.sum(0), x
    else:
        wf = w.reshape(-1, 1).to(x.dtype)
        n, m, xs = float(wf.sum()), (x * wf).sum(0), x * wf.sqrt()
    A = x.new_empty(D, In, D, In)
    A[:, 0, :, 0] = xs.T @ xs
    if In == 2:
        A[:, 0, :, 1] = m.unsqueeze(1)
        A[:, 1, :, 0] = m.unsqueeze(0)
        A[:, 1, :, 1] = n
    _add(s, "A", A.reshape(D * In, D * In))
    s.npos += n


def add_conv_inputs(layer, s: LayerSums, dtype: torch.dtype) -> None:
    """Add a convolution's input second moments (``approx="expand"``) from its input rows,
    every call (:mod:`fimfast.structured.convgram`)."""
    for x, _, _ in layer.calls:
        A, n = conv_gram(x, layer.module, dtype, layer.bias is not None)
        _add(s, "A", A)
        s.npos += float(n)


def _gram_reordered(s: LayerSums, x: torch.Tensor, one: bool, c, order: torch.Tensor) -> None:
    """:func:`gram_into` of ``x[:, order]`` (``"A"``), computed on ``x`` and reordered as a
    ``(n', n')`` matrix (cheaper than reordering the ``(rows, n)`` inputs)."""
    t = LayerSums()
    gram_into(t, "A", x, one, c)
    idx = order.to(x.device)
    if one:
        idx = torch.cat([idx, idx.new_full((1,), x.shape[1])])
    _add(s, "A", full_gram(t.A, True)[idx.unsqueeze(1), idx])


def _embedding_inputs(layer, s: LayerSums, ids: torch.Tensor, w, dtype) -> None:
    """Token counts: the diagonal of the one-hot second moment (the padding row left at 0)."""
    ids = ids.reshape(-1)
    w = torch.ones(ids.shape, dtype=dtype, device=ids.device) if w is None else \
        w.reshape(-1).to(dtype)
    A = torch.zeros(layer.I, dtype=dtype, device=ids.device).index_add_(0, ids, w)
    pad = padding_idx(layer.module)
    if pad is not None:
        A[pad] = 0
    _add(s, "A", A)
    s.npos += float(w.sum())


def _ln_full(xh: torch.Tensor, bias: bool) -> torch.Tensor:
    """``(N, T, D, I')`` LayerNorm inputs ``(x_hat, 1)`` per feature."""
    if not bias:
        return xh.unsqueeze(-1)
    return torch.stack([xh, torch.ones_like(xh)], -1)


def add_grads(layer, s: LayerSums, a: torch.Tensor, g: torch.Tensor, what: str, approx: str,
              eig: tuple | None, order: torch.Tensor | None = None) -> None:
    """Add one block of output gradients: ``G`` (``what="kfac"``), the squared gradients in the
    eigenbasis ``eig = (U_A, U_G)`` (``"ekfac"``) or the squared gradients and weight-bias cross
    terms (``"quasi_diag"``)."""
    dt = acc_dtype(g)
    g = g.to(dt)
    if what == "kfac":
        if approx == "reduce":
            g = g.sum(2, keepdim=True)
        _grad_gram(s, g)
        return
    if layer.kind == "embedding":
        return _embedding_squares(layer, s, a, g, None if eig is None else eig[1])
    if layer.kind == "layernorm":
        full = _ln_full(a.to(dt), layer.bias is not None)
        Mp = torch.einsum("mntd,ntdi->mndi", g, full)  # per-pair gradients (gamma_d, beta_d)
        if what == "ekfac":
            Mp = (Mp.flatten(2) @ eig[0].to(dt)).reshape(Mp.shape)
        _add(s, "D", (Mp * Mp).sum((0, 1)))
        if what == "quasi_diag" and layer.bias is not None:
            _add(s, "cross", (Mp[..., :1] * Mp[..., 1:]).sum((0, 1)))
        return
    bias = layer.bias is not None
    if order is not None:  # inputs a[..., order] in the layer's order: U_A's rows reordered
        if what != "ekfac":
            raise ValueError(f"reordered inputs are for what='ekfac'; got {what!r}")
        ua = eig[0]
        idx = order.to(ua.device)
        if bias:
            idx = torch.cat([idx, idx.new_full((1,), idx.numel())])
        eig = (ua.new_empty(ua.shape).index_copy_(0, idx, ua), eig[1])
    _linear_squares(s, a.to(dt), g, what, eig, bias)


def _grad_gram(s: LayerSums, g: torch.Tensor) -> None:
    """Add ``sum_{q,t} g_{q,t} g_{q,t}^T`` of ``(M, N, T, O)`` gradients. A convolution's
    come as a transposed view of ``(M, N, O, T)``: summed per pair as ``g_q g_q^T`` with ``g_q``
    ``(O, T)`` (one batched product) instead of copying them to ``(M N T, O)`` rows."""
    M, N, T, O = g.shape
    gt = g.transpose(2, 3)
    if T > 1 and not g.is_contiguous() and gt.is_contiguous() and O <= _BMM_MAX \
            and M * N * O <= 4 * g.numel():
        gt = gt.reshape(M * N, O, T)
        _add(s, "G", torch.bmm(gt, gt.mT).sum(0))
        return
    gram_into(s, "G", g.reshape(-1, O))


def _per_pair(g: torch.Tensor, a: torch.Tensor, bias: bool) -> torch.Tensor:
    """``(M, N, O, I')`` per-pair gradients ``sum_t g_{q,t} [a_{n,t}, 1]^T``."""
    Mp = torch.einsum("mnto,nti->mnoi", g, a)
    return torch.cat([Mp, g.sum(2).unsqueeze(-1)], -1) if bias else Mp


def _project(a: torch.Tensor, ua: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[a, 1] U_A`` without forming ``[a, 1]``."""
    if not bias:
        return a @ ua
    return torch.addmm(ua[-1], a.reshape(-1, a.shape[-1]), ua[:-1]).reshape(
        a.shape[:-1] + (ua.shape[1],))


def _linear_squares(s: LayerSums, a, g, what: str, eig, bias: bool) -> None:
    """Squared per-pair gradients of the ``(O, I')`` matrix (inputs ``a`` without the 1 of the
    bias), in the eigenbasis for ``"ekfac"``: ``U_G^T M_q U_A`` with ``M_q = sum_t g_t a_t^T``.

    One position per sample: ``(g a^T)^2 = g^2 (a^2)^T``, so ``D = (sum_q ghat^2)^T ahat^2``, one
    product of the squared projections ``ghat = U_G^T g``, ``ahat = U_A^T [a, 1]``. Several
    positions: the projections first (``N T (O^2 + I'^2)`` multiply-adds besides the per-pair
    sums) or the per-pair gradients first and then their rotation (:func:`_rotated_pairs`),
    whichever is cheaper (convolutions with more locations than channels: the latter)."""
    M, N, T, O = g.shape
    In = a.shape[-1] + bias
    own = False  # whether g and a are this function's own tensors (squared in place)
    if what == "ekfac":
        ua, ug = (u.to(g.dtype) for u in eig)
        # multiply-adds per sample: projections first; per-pair sums of the rotated g, then
        # U_A; per-pair gradients, then U_G and U_A (the per-pair sums, O T I, in all three)
        proj, out_first, pairs = T * (O * O + In * In), T * O * O + O * In * In, O * In * (O + In)
        if T > 1 and min(out_first, pairs) < proj:
            Mp = _rotated_pairs(g, a, ua, ug, bias, out_first < pairs)
            _add(s, "D", Mp.square_().sum(0))
            return
        g, a, bias, own = g @ ug, _project(a, ua, bias), False, True
    want_cross = what == "quasi_diag" and bias
    if T == 1:  # one position: (g a^T)^2 = g^2 a^2 summed without per-pair matrices
        g2 = g[:, :, 0].square_() if own else g[:, :, 0] ** 2
        g2 = g2[0] if M == 1 else g2.sum(0)  # (N, O)
        a1 = a[:, 0]
        D = g2.T @ (a1.square_() if own else a1**2)
        if bias:
            D = torch.cat([D, g2.sum(0).unsqueeze(1)], 1)
        cross = g2.T @ a[:, 0] if want_cross else None
    else:
        Mp = _per_pair(g, a, bias)
        D = (Mp**2).sum((0, 1))
        cross = (Mp[..., :-1] * Mp[..., -1:]).sum((0, 1)) if want_cross else None
    _add(s, "D", D)
    if cross is not None:
        _add(s, "cross", cross)


def _rotated_pairs(g, a, ua, ug, bias: bool, out_first: bool) -> torch.Tensor:
    """``(M N, O, I')`` per-pair gradients in the eigenbasis, ``U_G^T (sum_t g_t [a_t, 1]^T)
    U_A``. ``out_first``: the output side rotated first (``T O^2`` a pair instead of ``O^2 I'``),
    then the per-pair sums of the rotated ``g`` (``O T I``), then the input side (``O I'^2``; the
    bias row of ``U_A`` as a rank-one update, no ``[a, 1]``)."""
    M, N, T, O = g.shape
    I = a.shape[-1]  # noqa: E741
    if not out_first:
        Mp = ug.T @ _per_pair(g, a, bias) @ ua
        return Mp.reshape(M * N, O, -1)
    gh = g @ ug
    R = torch.einsum("mnto,nti->mnoi", gh, a).reshape(-1, I) @ (ua[:-1] if bias else ua)
    if bias:
        R.addr_(gh.sum(2).reshape(-1), ua[-1])
    return R.reshape(M * N, O, -1)


def _embedding_squares(layer, s: LayerSums, ids: torch.Tensor, g: torch.Tensor,
                       ug: torch.Tensor | None) -> None:
    """Squared per-pair gradients of the ``(D, V)`` transposed embedding weight, rotated by
    ``U_G`` on the output side (EKFAC; the input basis of a diagonal ``A`` is the identity):
    ``M_q[:, v] = sum_{t: id_t = v} g_{q,t}``, summed per (sample, token) with ``index_add``
    instead of forming ``(D, V)`` matrices."""
    M, N, T, D = g.shape
    if ug is not None:
        g = g @ ug.to(g.dtype)
    V = layer.I
    ids = ids.reshape(N, T)
    pad = padding_idx(layer.module)
    if pad is not None:
        g = g * (ids != pad).to(g.dtype).reshape(1, N, T, 1)
    key = (torch.arange(N, device=ids.device).unsqueeze(1) * V + ids).reshape(-1)
    uniq, inv = torch.unique(key, return_inverse=True)
    h = g.new_zeros(M, uniq.numel(), D).index_add_(1, inv, g.reshape(M, N * T, D))
    out = g.new_zeros(D, V).index_add_(1, uniq % V, (h * h).sum(0).T)
    _add(s, "D", out)
