"""Per-layer sums of a Kronecker-family pass, for each layer kind of
:mod:`fimfast.structured.capture` (formulas: docs/structured.md, "KFAC", "EKFAC").

Inputs ``a`` come from :func:`~fimfast.structured.capture.inputs_of` and output gradients ``g``
``(M, N, T, O)`` (``M`` cotangents) from :func:`~fimfast.structured.capture.out_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fimfast.structured import gram


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

    FIELDS = ("A", "G", "D", "cross")


# block rows of a symmetric Gram matrix ``x^T x`` of more than _BLOCKED columns: only the blocks on
# and right of the diagonal are computed (one ``addmm_`` per block row, in place into the running
# sum; 60% of the products of a full ``x^T x`` for 785 columns, 56% for 1025), and
# :func:`full_gram` mirrors them when read. Below, one full product (the mirroring would cost
# about what the blocks save; measured on one CPU thread).
_BLOCK = 128
_BLOCKED = 640


def gram_into(s: LayerSums, name: str, x: torch.Tensor) -> None:
    """Add ``x^T x`` (``x``: ``(rows, n)``) to the field ``name`` of ``s`` (for ``n >
    _BLOCKED`` its upper block rows only, the rest 0: read it with :func:`full_gram`)."""
    n = x.shape[1]
    out = getattr(s, name)
    if n <= _BLOCKED:
        if out is None:
            setattr(s, name, x.T @ x)
        else:
            out.addmm_(x.T, x)
        return
    first = out is None
    if first:
        out = torch.empty(n, n, dtype=x.dtype, device=x.device)
        setattr(s, name, out)
    for i in range(0, n, _BLOCK):
        out[i:i + _BLOCK, i:].addmm_(x[:, i:i + _BLOCK].T, x[:, i:], beta=0 if first else 1)
        if first:
            out[i + _BLOCK:, i:i + _BLOCK].zero_()


def full_gram(m: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The symmetric matrix of a sum kept by :func:`gram_into` (a new tensor unless
    ``inplace``)."""
    n = m.shape[0]
    out = m if inplace else m.clone()
    if n <= _BLOCKED:
        return out
    for i in range(0, n - _BLOCK, _BLOCK):
        out[i + _BLOCK:, i:i + _BLOCK] = out[i:i + _BLOCK, i + _BLOCK:].T
    return out


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _add(s: LayerSums, name: str, value: torch.Tensor) -> None:
    old = getattr(s, name)
    if old is None:
        setattr(s, name, value)
    else:
        old.add_(value)


def add_inputs(layer, s: LayerSums, a: torch.Tensor, w: torch.Tensor | None, approx: str,
               dtype: torch.dtype) -> None:
    """Add the input second moments of one batch (``w``: ``(N, T)`` position weights)."""
    if layer.kind == "embedding":
        if approx == "reduce":  # sparse rows a_bar_n (fimfast.structured.gram)
            s.A = gram.append(s.A, gram.rows(a, w, layer.I, layer.module.padding_idx, dtype))
            s.npos += float(a.shape[0])
            return None
        return _embedding_inputs(layer, s, a, w, dtype)
    if layer.kind == "layernorm" and approx == "expand":
        return _ln_expand(layer, s, a.to(dtype), w)
    if layer.kind == "layernorm":  # (N, T, D I'): (x_hat_d, 1) of every feature, row-major
        a = _ln_full(a.to(dtype), layer.bias is not None).flatten(2)
    else:
        a = a.to(dtype)
    if w is not None:
        w = w.to(dtype)
    if approx == "expand":  # 0/1 weights: sum w a a^T = (sqrt(w) a)^T (sqrt(w) a)
        npos = float(a.shape[0] * a.shape[1]) if w is None else float(w.sum())
        a2 = a.reshape(-1, a.shape[-1])
        gram_into(s, "A", a2 if w is None else a2 * w.reshape(-1, 1).sqrt())
    else:  # reduce: the mean input over the positions of each sample
        if w is None:
            abar = a.mean(1)
        else:
            ww = w.reshape(w.shape + (1,) * (a.dim() - 2))
            abar = (a * ww).sum(1) / ww.sum(1).clamp_min(1)
        npos = float(a.shape[0])
        gram_into(s, "A", abar)
    s.npos += npos


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


def _embedding_inputs(layer, s: LayerSums, ids: torch.Tensor, w, dtype) -> None:
    """Token counts: the diagonal of the one-hot second moment (the padding row left at 0)."""
    ids = ids.reshape(-1)
    w = torch.ones(ids.shape, dtype=dtype, device=ids.device) if w is None else \
        w.reshape(-1).to(dtype)
    A = torch.zeros(layer.I, dtype=dtype, device=ids.device).index_add_(0, ids, w)
    pad = layer.module.padding_idx
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
              eig: tuple | None) -> None:
    """Add one block of output gradients: ``G`` (``what="kfac"``), the squared gradients in the
    eigenbasis ``eig = (U_A, U_G)`` (``"ekfac"``) or the squared gradients and weight-bias cross
    terms (``"quasi_diag"``)."""
    dt = acc_dtype(g)
    g = g.to(dt)
    if what == "kfac":
        O = g.shape[-1]
        gram_into(s, "G", g.reshape(-1, O) if approx == "expand" else g.sum(2).reshape(-1, O))
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
    _linear_squares(s, a.to(dt), g, what, eig, layer.bias is not None)


def _linear_squares(s: LayerSums, a, g, what: str, eig, bias: bool) -> None:
    if what == "ekfac":
        ua, ug = eig
        g, a = g @ ug.to(g.dtype), a @ ua.to(g.dtype)
    want_cross = what == "quasi_diag" and bias
    if g.shape[2] == 1:  # one position: (g a^T)^2 = g^2 a^2 summed without per-pair matrices
        g2 = (g[:, :, 0] ** 2).sum(0)  # (N, O)
        D = g2.T @ (a[:, 0] ** 2)
        cross = g2.T @ a[:, 0, :-1] if want_cross else None
    else:
        Mp = torch.einsum("mnto,nti->mnoi", g, a)  # per-pair gradients of the (O, I') matrix
        D = (Mp**2).sum((0, 1))
        cross = (Mp[..., :-1] * Mp[..., -1:]).sum((0, 1)) if want_cross else None
    _add(s, "D", D)
    if cross is not None:
        _add(s, "cross", cross)


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
    pad = layer.module.padding_idx
    if pad is not None:
        g = g * (ids != pad).to(g.dtype).reshape(1, N, T, 1)
    key = (torch.arange(N, device=ids.device).unsqueeze(1) * V + ids).reshape(-1)
    uniq, inv = torch.unique(key, return_inverse=True)
    h = g.new_zeros(M, uniq.numel(), D).index_add_(1, inv, g.reshape(M, N * T, D))
    out = g.new_zeros(D, V).index_add_(1, uniq % V, (h * h).sum(0).T)
    _add(s, "D", out)
