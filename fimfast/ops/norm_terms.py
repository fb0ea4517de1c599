"""``norm_terms``: the per-column, per-sample gradients of a norm's affine parameters.

``W[m, n] = sum_t G[m, n, t] * X[n, t]`` (the weight, ``X`` the normalised input) and
``B[m, n] = sum_t G[m, n, t]`` (the bias), for :mod:`fimfast.rules.norm`. The ``cpp`` backend
forms both in one pass over ``G`` without the ``(M, N, T, D)`` product
(``csrc/cpu/norm_terms.cpp``); an extension built before the op runs the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fimfast.ops.registry import resolve

_OP = "norm_terms"  # the op's name in fimfast._C


def norm_terms_torch(
    G: torch.Tensor, X: torch.Tensor, eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: ``((G * X).sum(2), G.sum(2))``, ``X`` first normalised over ``D``
    when ``eps`` is given."""
    if eps is not None:
        X = F.layer_norm(X, X.shape[-1:], None, None, eps)
    return (G * X).sum(2), G.sum(2)


def norm_terms_cpp(
    G: torch.Tensor, X: torch.Tensor, eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`norm_terms` on the CPU (float32 and float64, one dtype; otherwise the reference)."""
    op = getattr(torch.ops.fimfast, _OP, None)
    if op is None or G.dtype != X.dtype or G.dtype not in (torch.float32, torch.float64):
        return norm_terms_torch(G, X, eps)
    return op(G, X, None if eps is None else float(eps))


def norm_terms(
    G: torch.Tensor, X: torch.Tensor, eps: float | None = None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a norm's weight and bias per column and sample.

    Args:
        G: ``(M, N, T, D)`` gradients at the norm's output, per column, sample and position.
        X: ``(N, T, D)`` normalised input, ``G``'s dtype; with ``eps``, a LayerNorm's input,
            each row normalised as ``(x - mean) / sqrt(var + eps)`` over ``D`` first.
        eps: see ``X``.
        backend: as in :func:`fimfast.ops.probe_logit_grad`.

    Returns:
        ``(W, B)``, both ``(M, N, D)`` in ``G``'s dtype.
    """
    if G.dim() != 4 or X.dim() != 3 or G.shape[1:] != X.shape:
        raise ValueError(
            f"G must be (M, N, T, D) and X (N, T, D); got {tuple(G.shape)} and {tuple(X.shape)}")
    _, fn = resolve("norm_terms", backend, G.device)
    return fn(G, X, eps)
