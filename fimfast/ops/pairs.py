"""Squares of a parameter used at ``T`` positions of a sample, by pairs of positions.

``sum_{m,n} (P[m, n]^T Q[n])^2`` (the squared per-sample gradients of a weight used at ``T``
positions, ``P`` ``(M, N, T, O)`` the output-side gradients of ``M`` columns, ``Q`` ``(N, T, I)``
the inputs) is, with ``A[n, (t, s), o] = sum_m P[m, n, t, o] P[m, n, s, o]`` over the pairs
``t <= s`` (:func:`fimfast.ops.pair_gram`) and ``Z[n, (t, s), i] = w Q[n, t, i] Q[n, s, i]``
(``w`` 1 on the diagonal, 2 off it; :func:`pair_inputs`),
``sum_{n, (t, s)} A[n, (t, s)]^T Z[n, (t, s)]``: one product whose inner dimension is
``N T (T + 1) / 2``, in place of ``M N`` per-sample products of inner dimension ``T`` that are
written and squared (:func:`fimfast.ops.shared_sq`). It costs ``N T (T + 1) / 2 O I``
multiply-adds against ``M N T O I``, in a product that runs near the machine's peak, and ``A``
adds up over chunks of columns (docs/math.md §4, "Recurrent layers").
"""

from __future__ import annotations

import torch

from fimfast.dtypes import compute_dtype


def pair_index(T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)`` of the pairs ``t <= s`` of ``T`` positions, row-major (the kernels' order)."""
    ts = torch.triu_indices(T, T, 0, device=device)
    return ts[0], ts[1]


def pair_inputs(Q: torch.Tensor, off: float = 2.0, ones: bool = False) -> torch.Tensor:
    """``Z`` ``(N, T (T + 1) / 2, I)`` of an input side ``Q`` ``(N, T, I)`` (module docstring):
    ``Q[:, t] Q[:, s]`` for the pairs ``t <= s``, times ``off`` off the diagonal, in ``Q``'s
    compute dtype (float32, float64 for float64); ``ones``: with one more feature, the pairs of
    an input of ones (1 on the diagonal, ``off`` off it: a bias's). Formed by one product per
    position into slices of the output (an index of the pairs writes it 10x slower: 5.7 against
    0.5 ms for ``(64, 16, 128)``, 1 thread)."""
    Q = Q.to(compute_dtype(Q.dtype))
    N, T, I = Q.shape
    Z = Q.new_empty(N, T * (T + 1) // 2, I + int(ones))
    Qo = Q * off if off != 1.0 else Q
    k = 0
    for t in range(T):
        q = Q[:, t : t + 1]
        torch.mul(q, q, out=Z[:, k : k + 1, :I])
        torch.mul(q, Qo[:, t + 1 :], out=Z[:, k + 1 : k + T - t, :I])
        if ones:
            Z[:, k, I] = 1.0
            Z[:, k + 1 : k + T - t, I] = off
        k += T - t
    return Z


def pair_products(A: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``sum_{n, pair} A[n, pair]^T Z[n, pair]`` ``(O, I)``: the squares of the module
    docstring from ``A`` ``(N, NP, O)`` and ``Z`` ``(N, NP, I)``."""
    return A.reshape(-1, A.shape[-1]).t() @ Z.reshape(-1, Z.shape[-1]).to(A.dtype)


def pair_gram_torch_(A: torch.Tensor, P: list, accumulate: bool) -> None:
    """Reference of :func:`fimfast.ops.pair_gram` (into ``A``, ``P`` the positions' ``(M, N,
    O)``), a few samples at a time."""
    P = torch.stack([p.to(A.dtype) for p in P], 2)
    M, N, T, O = P.shape
    t, s = pair_index(T, P.device)
    step = max(1, (16 << 20) // max(1, 4 * M * t.numel() * O))
    for n0 in range(0, N, step):
        Pn = P[:, n0 : n0 + step]
        part = (Pn.index_select(2, t) * Pn.index_select(2, s)).sum(0)
        if accumulate:
            A[n0 : n0 + step] += part
        else:
            A[n0 : n0 + step] = part
