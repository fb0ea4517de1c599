"""Kronecker factors of each layer kind (:mod:`fimfast.structured.capture`) acting on a layer's
``(O, I')`` matrix ``X`` (docs/structured.md, "KFAC"):

* ``linear``: ``A`` ``(I', I')``, ``G`` ``(O, O)``: ``X -> G X A``;
* ``embedding``: ``A`` ``(V,)`` (a diagonal input factor, the token counts), ``G`` ``(D, D)``:
  ``X -> G X diag(A)``; its input eigenbasis is the identity (``U_A = None``). Under
  ``kfac_approx="reduce"`` ``A`` is a sparse ``(N, V)`` row factor ``C`` of ``C^T C`` instead
  (:mod:`fimfast.structured.gram`);
* ``layernorm``: ``A`` ``(D I', D I')`` (second moment of the ``(D, I')`` input ``(x_hat_d, 1)``
  flattened row-major), ``G`` ``(D, D)``; the block is their Hadamard product
  ``F[(d, i), (e, j)] = G[d, e] A[(d, i), (e, j)]``, not a Kronecker product, so its eigenbasis
  ``U_A`` is that of the ``(D I', D I')`` block itself (``U_G = None``).

EKFAC keeps ``(U_A, U_G, D)`` with ``X -> U_G (D o (U_G^T X U_A)) U_A^T`` (for a layernorm
``vec X -> U_A (D o (U_A^T vec X))``).
"""

from __future__ import annotations

import torch

from fimfast.structured import gram
from fimfast.structured.sums import HalfGram


def expected_shapes(kind: str, O: int, In: int) -> tuple[tuple[int, ...], tuple[int, ...]]:  # noqa: E741
    """Shapes of ``(A, G)``."""
    if kind == "embedding":
        return (In,), (O, O)
    if kind == "layernorm":
        return (O * In, O * In), (O, O)
    return (In, In), (O, O)


def eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric factor, or a batch of them (symmetrised), in its dtype.

    float32 ``eigh`` can fail on input factors with many equal eigenvalues (an MNIST layer's
    785 x 785 ``A``, whose constant-zero pixels give a large null space); such a factor is
    decomposed in float64 instead (on this CPU build 785 x 785 float64 ``eigh`` takes seconds,
    float32 a fraction of one, so float64 is the fallback, not the default).

    A :class:`~fimfast.structured.sums.HalfGram` is decomposed from its upper triangle.

    The eigenvectors are returned row-major (LAPACK writes them column-major): EKFAC's refit
    multiplies every batch's inputs and output gradients by them, and on one CPU thread (MKL)
    ``[a, 1] U_A`` with a row-major ``U_A`` takes 10-20% less time (128 rows: 1.07 against 1.19 ms
    for 785 columns, 0.46 against 0.50 for 513), once per eigendecomposition for a copy
    (benchmarks/results/kfac_cputime_2026-12-06_kfac2.md)."""
    lam, U = _eigh(m)
    return lam, U.contiguous()


def _eigh(m) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(m, HalfGram):
        out = m.eigh()
        if out is not None:
            return out
        m = m.full()
    sym = (m + m.mT) / 2
    try:
        lam, U = torch.linalg.eigh(sym)
        if bool(torch.isfinite(lam).all()) and bool(torch.isfinite(U).all()):
            return lam, U
    except torch.linalg.LinAlgError:
        pass
    # float32 LAPACK either raises or (measured on such a factor) returns NaN without raising
    lam, U = torch.linalg.eigh(sym.double())
    return lam.to(m.dtype), U.to(m.dtype)


def _ln4(A, G):
    """A layernorm's ``A`` as ``(D, I', D, I')``."""
    D = G.shape[0]
    return A.reshape(D, -1, D, A.shape[0] // D)


def kfac_mv(kind: str, A, G, X):
    if kind == "embedding":
        return gram.mv(A, G, X) if A.is_sparse else (G @ X) * A
    if kind == "layernorm":
        return torch.einsum("de,diej,ej->di", G, _ln4(A, G), X)
    return G @ X @ A


def kfac_block(kind: str, A, G):
    """The dense ``(O I', O I')`` block, rows in the row-major order of ``X``."""
    if kind == "embedding":
        return torch.kron(G, gram.dense_a(A) if A.is_sparse else torch.diag(A))
    if kind == "layernorm":
        n = A.shape[0] // G.shape[0]
        return torch.kron(G, A.new_ones(n, n)) * A
    return torch.kron(G, A)


def kfac_diag(kind: str, A, G):
    if kind == "embedding":
        return G.diagonal().unsqueeze(1) * (gram.diag_a(A) if A.is_sparse else A).unsqueeze(0)
    if kind == "layernorm":
        return G.diagonal().unsqueeze(1) * A.diagonal().reshape(G.shape[0], -1)
    return G.diagonal().unsqueeze(1) * A.diagonal().unsqueeze(0)


def kfac_fro2(kind: str, A, G) -> torch.Tensor:
    if A.is_sparse:
        return gram.fro2_a(A) * (G.double() ** 2).sum()
    A, G = A.double(), G.double()
    if kind == "layernorm":
        return (G**2 * (_ln4(A, G) ** 2).sum((1, 3))).sum()
    return (A**2).sum() * (G**2).sum()


def eig(kind: str, A, G):
    """``(lam_A, U_A, lam_G, U_G)`` (``U_A`` / ``U_G`` ``None`` where the basis is the
    identity)."""
    if kind == "embedding":  # reduce: (lam_A, W, ...) with U_A = C^T W lam_A^{-1/2}
        return (*gram.eig(A), *eigh(G)) if A.is_sparse else (A, None, *eigh(G))
    if kind == "layernorm":
        lam, U = eigh(kfac_block(kind, A, G))
        return lam.reshape(G.shape[0], -1), U, None, None
    return (*eigh(A), *eigh(G))


def eig_values(kind: str, lam_A, lam_G):
    """``D`` of a KFAC in its own eigenbasis: ``lam_G lam_A^T`` (layernorm: the block's own
    eigenvalues, ``lam_A``)."""
    if kind == "layernorm":
        return lam_A
    return lam_G.unsqueeze(1) * lam_A.unsqueeze(0)


def rotate(kind: str, UA, UG, X):
    """``U_G^T X U_A``: ``X`` in the eigenbasis."""
    if kind == "layernorm":
        return (UA.T @ X.reshape(-1)).reshape(X.shape)
    X = UG.T @ X
    return X if UA is None else X @ UA


def unrotate(kind: str, UA, UG, C):
    """``U_G C U_A^T``: back from the eigenbasis."""
    if kind == "layernorm":
        return (UA @ C.reshape(-1)).reshape(C.shape)
    C = UG @ C
    return C if UA is None else C @ UA.T


def ekfac_block(kind: str, UA, UG, D):
    if kind == "layernorm":
        return (UA * D.reshape(1, -1)) @ UA.T
    ua = torch.eye(D.shape[1], dtype=D.dtype, device=D.device) if UA is None else UA
    K = torch.kron(UG.contiguous(), ua.contiguous())
    return (K * D.reshape(1, -1)) @ K.T


def ekfac_diag(kind: str, UA, UG, D):
    if kind == "layernorm":
        return ((UA**2) @ D.reshape(-1)).reshape(D.shape)
    out = (UG**2) @ D
    return out if UA is None else out @ (UA**2).T
