"""The input factor of an ``nn.Embedding`` under ``kfac_approx="reduce"``, kept as a sparse row
factor (docs/structured.md, "KFAC", nn.Embedding).

A sample's mean one-hot input ``a_bar_n = c_n / T_n`` (``c_n``: its token counts over the weighted
positions, the ``padding_idx`` entry 0) gives ``A = (1/N) sum_n a_bar_n a_bar_n^T``, a ``V x V``
matrix of rank at most ``N``. It is kept as the sparse ``(N, V)`` factor ``C`` with rows
``a_bar_n / sqrt(N)`` (``A = C^T C``; at most one entry per token position). ``A`` is never
formed: ``X A = (X C^T) C``; its eigenpairs come from the ``N x N`` Gram matrix
``K = C C^T = W Lam W^T``: ``A = U Lam U^T`` with ``U = C^T W Lam^{-1/2}`` (only the ``r`` positive
eigenvalues), applied as products with ``C`` and ``W`` without forming ``U``. ``N`` is bounded by
:data:`~fimfast.structured.base.DENSE_LIMIT` for the operations that need ``K``.
"""

from __future__ import annotations

import torch

from fimfast.structured.base import DENSE_LIMIT


def _coo(idx: torch.Tensor, val: torch.Tensor, size) -> torch.Tensor:
    """A coalesced sparse COO tensor (indices built here: in range, so not re-checked)."""
    return torch.sparse_coo_tensor(idx, val, size, check_invariants=False).coalesce()


def rows(ids: torch.Tensor, w: torch.Tensor | None, V: int, pad: int | None,
         dtype: torch.dtype) -> torch.Tensor:
    """Sparse ``(N, V)`` rows ``a_bar_n`` of a batch of token ids ``(N, T)`` with position
    weights ``w`` ``(N, T)`` (``None``: all 1), the ``pad`` column left out."""
    N = ids.shape[0]
    ids = ids.reshape(N, -1)
    w = torch.ones(ids.shape, dtype=dtype, device=ids.device) if w is None else w.to(dtype)
    val = w / w.sum(1, keepdim=True).clamp_min(1)
    keep = val != 0
    if pad is not None:
        keep &= ids != pad
    n = torch.arange(N, device=ids.device).unsqueeze(1).expand_as(ids)
    idx = torch.stack([n[keep], ids[keep]])
    return _coo(idx, val[keep], (N, V))


def append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The rows of ``old`` followed by those of ``new``."""
    if old is None:
        return new
    idx = new.indices().clone()
    idx[0] += old.shape[0]
    return _coo(torch.cat([old.indices(), idx], 1), torch.cat([old.values(), new.values()]),
                (old.shape[0] + new.shape[0], old.shape[1]))


def scaled(C: torch.Tensor, n: float) -> torch.Tensor:
    """The factor of the mean ``(1/n) sum_n a_bar a_bar^T``: ``C / sqrt(n)`` (a new tensor)."""
    return C * (1.0 / max(n, 1.0) ** 0.5)


def _right(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``X C^T`` (``(D, N)``) for a dense ``(D, V)`` ``X``."""
    return torch.sparse.mm(C, X.T).T


def _back(Y: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``Y C`` (``(D, V)``) for a dense ``(D, N)`` ``Y``."""
    return torch.sparse.mm(C.t(), Y.T).T


def mv(C, G, X):
    """``G X A`` with ``A = C^T C``."""
    return _back(_right(G @ X, C), C)


def dense_a(C):
    return C.t() @ C.to_dense()


def diag_a(C):
    """The diagonal of ``A`` (``(V,)``): column sums of ``C``'s squared entries."""
    return torch.sparse.sum(C * C, 0).to_dense()


def check_rows(C, what: str) -> None:
    N = C.shape[0]
    if N > DENSE_LIMIT:
        raise ValueError(
            f"{what} of an embedding's kfac_approx='reduce' input factor goes through the "
            f"{N} x {N} Gram matrix of its {N} samples; the limit is {DENSE_LIMIT} samples. Use "
            "kfac_approx='expand', fewer samples, or freeze the embedding")


def fro2_a(C) -> torch.Tensor:
    """``||A||_F^2 = ||C C^T||_F^2``."""
    check_rows(C, "frobenius_norm")
    K = (C @ C.to_dense().T).double()
    return (K * K).sum()


def eig(C) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam, W)``: the positive eigenvalues of ``A`` (descending) and the ``(N, r)``
    eigenvectors of ``K = C C^T`` they come from (``U = C^T W diag(lam)^{-1/2}``)."""
    check_rows(C, "solve / inverse")
    K = (C @ C.to_dense().T).double()
    lam, W = torch.linalg.eigh((K + K.T) / 2)
    keep = lam > lam.max().clamp_min(0) * K.shape[0] * torch.finfo(C.dtype).eps
    lam, W = lam[keep].flip(0), W[:, keep].flip(1)
    return lam.to(C.dtype), W.to(C.dtype)


def solve(C, lam_a, W, lam_g, UG, X, d: float):
    """``(A (x) G + d I)^{-1}`` applied to the ``(D, V)`` matrix ``X``: in the eigenbasis of
    ``G`` and of ``A``'s range ``1 / (lam_G lam_A + d)``, on the rest of the input space
    (where ``A`` is 0) ``1 / d``."""
    if d <= 0:
        raise ValueError("damping must be > 0: an embedding's kfac_approx='reduce' input factor "
                         "has rank at most the number of samples, so A (x) G is singular")
    Y = UG.T @ X
    s = lam_a.rsqrt()
    P = (_right(Y, C) @ W) * s  # Y U, (D, r)
    scale = 1.0 / (lam_g.unsqueeze(1) * lam_a.unsqueeze(0) + d) - 1.0 / d
    Z = Y / d + _back((P * scale * s) @ W.T, C)  # (P o scale) U^T
    return UG @ Z


def pack(C) -> dict[str, torch.Tensor]:
    return {"indices": C.indices(), "values": C.values()}


def unpack(t: dict, key: str, shape) -> torch.Tensor:
    return _coo(t[f"{key}_indices"], t[f"{key}_values"], tuple(shape))


def gather(C, group) -> torch.Tensor:
    """The rows of every rank of ``group``, in rank order (collective)."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    meta = torch.tensor([C.shape[0], C._nnz()], dtype=torch.int64, device=C.device)
    table = [torch.empty_like(meta) for _ in range(size)]
    dist.all_gather(table, meta, group=group)
    n_rows, nnz = [int(t[0]) for t in table], [int(t[1]) for t in table]
    m = max(nnz)
    idx = torch.zeros(2, m, dtype=torch.int64, device=C.device)
    val = torch.zeros(m, dtype=C.dtype, device=C.device)
    idx[:, : C._nnz()], val[: C._nnz()] = C.indices(), C.values()
    idxs, vals = [torch.empty_like(idx) for _ in table], [torch.empty_like(val) for _ in table]
    dist.all_gather(idxs, idx, group=group)
    dist.all_gather(vals, val, group=group)
    out = None
    for n, k, i, v in zip(n_rows, nnz, idxs, vals):
        out = append(out, _coo(i[:, :k], v[:k], (n, C.shape[1])))
    return out
