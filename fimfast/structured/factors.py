"""Kronecker factors of each layer kind (:mod:`fimfast.structured.capture`) acting on a layer's
``(O, I')`` matrix ``X`` (docs/structured.md, "KFAC"):

* ``linear``: ``A`` ``(I', I')``, ``G`` ``(O, O)``: ``X -> G X A``;
* ``embedding``: ``A`` ``(V,)`` (a diagonal input factor, the token counts), ``G`` ``(D, D)``:
  ``X -> G X diag(A)``; its input eigenbasis is the identity (``U_A = None``);
* ``layernorm``: ``A`` ``(D, I', I')`` (one input factor per feature), ``G`` ``(D,)`` (one scalar
  output factor per feature): ``X[d] -> G[d] A[d] X[d]``; ``U_G = None``.

EKFAC keeps ``(U_A, U_G, D)`` with ``X -> U_G (D o (U_G^T X U_A)) U_A^T`` (per feature for a
layernorm).
"""

from __future__ import annotations

import torch


def expected_shapes(kind: str, O: int, In: int) -> tuple[tuple[int, ...], tuple[int, ...]]:  # noqa: E741
    """Shapes of ``(A, G)``."""
    if kind == "embedding":
        return (In,), (O, O)
    if kind == "layernorm":
        return (O, In, In), (O,)
    return (In, In), (O, O)


def eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric factor, or a batch of them (symmetrised), in its dtype.

    float32 ``eigh`` can fail on input factors with many equal eigenvalues (an MNIST layer's
    785 x 785 ``A``, whose constant-zero pixels give a large null space); such a factor is
    decomposed in float64 instead (on this CPU build 785 x 785 float64 ``eigh`` takes seconds,
    float32 a fraction of one, so float64 is the fallback, not the default)."""
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


def kfac_mv(kind: str, A, G, X):
    if kind == "embedding":
        return (G @ X) * A
    if kind == "layernorm":
        return G.unsqueeze(1) * torch.einsum("dij,dj->di", A, X)
    return G @ X @ A


def kfac_block(kind: str, A, G):
    """The dense ``(O I', O I')`` block, rows in the row-major order of ``X``."""
    if kind == "embedding":
        return torch.kron(G, torch.diag(A))
    if kind == "layernorm":
        return torch.block_diag(*(G.reshape(-1, 1, 1) * A))
    return torch.kron(G, A)


def kfac_diag(kind: str, A, G):
    if kind == "embedding":
        return G.diagonal().unsqueeze(1) * A.unsqueeze(0)
    if kind == "layernorm":
        return G.unsqueeze(1) * A.diagonal(dim1=1, dim2=2)
    return G.diagonal().unsqueeze(1) * A.diagonal().unsqueeze(0)


def kfac_fro2(kind: str, A, G) -> torch.Tensor:
    A, G = A.double(), G.double()
    if kind == "layernorm":
        return (G**2 * (A**2).sum((1, 2))).sum()
    return (A**2).sum() * (G**2).sum()


def eig(kind: str, A, G):
    """``(lam_A, U_A, lam_G, U_G)`` (``U_A`` / ``U_G`` ``None`` where the basis is the
    identity)."""
    if kind == "embedding":
        return (A, None, *eigh(G))
    if kind == "layernorm":
        return (*eigh(A), G, None)
    return (*eigh(A), *eigh(G))


def eig_values(kind: str, lam_A, lam_G):
    """``D`` of a KFAC in its own eigenbasis: ``lam_G lam_A^T`` (per feature for layernorm)."""
    if kind == "layernorm":
        return lam_G.unsqueeze(1) * lam_A
    return lam_G.unsqueeze(1) * lam_A.unsqueeze(0)


def rotate(kind: str, UA, UG, X):
    """``U_G^T X U_A``: ``X`` in the eigenbasis."""
    if kind == "layernorm":
        return torch.einsum("dji,dj->di", UA, X)
    X = UG.T @ X
    return X if UA is None else X @ UA


def unrotate(kind: str, UA, UG, C):
    """``U_G C U_A^T``: back from the eigenbasis."""
    if kind == "layernorm":
        return torch.einsum("dij,dj->di", UA, C)
    C = UG @ C
    return C if UA is None else C @ UA.T


def ekfac_block(kind: str, UA, UG, D):
    if kind == "layernorm":
        return torch.block_diag(*((UA * D.unsqueeze(1)) @ UA.mT))
    ua = torch.eye(D.shape[1], dtype=D.dtype, device=D.device) if UA is None else UA
    K = torch.kron(UG.contiguous(), ua.contiguous())
    return (K * D.reshape(1, -1)) @ K.T


def ekfac_diag(kind: str, UA, UG, D):
    if kind == "layernorm":
        return torch.einsum("dij,dj->di", UA**2, D)
    out = (UG**2) @ D
    return out if UA is None else out @ (UA**2).T
