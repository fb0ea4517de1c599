"""Spectrum of the core FIM ``I(z)`` of every row (docs/math.md §7).

For the categorical likelihood ``I(z) = diag(p) - p p^T``. Its ``C - 1`` non-zero eigenpairs solve
the secular equation ``sum_c p_c^2 / (p_c - lam) = 1`` (one root in each interval between
consecutive sorted probabilities; ties deflated), which :func:`fimfast.ops.core_topk` solves to
rounding; the remaining eigenvalue is 0 with eigenvector ``1 / sqrt(C)``. The bernoulli and
gaussian core FIMs are diagonal, so their spectrum is their sorted diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fimfast import ops
from fimfast.types import LIKELIHOODS

__all__ = ["CoreSpectrum", "core_spectrum"]


@dataclass
class CoreSpectrum:
    """Eigen-decomposition of ``I(z)`` for every row, with the bounds of docs/math.md §7.

    Leading dimensions ``...`` are those of the logits without the class axis.

    Attributes:
        eigenvalues: ``(..., C)`` in descending order (the categorical null eigenvalue 0 last).
        eigenvectors: ``(..., C, C)``; ``eigenvectors[..., j, :]`` is the unit eigenvector of
            ``eigenvalues[..., j]``, so ``I = V^T diag(lam) V`` with ``V = eigenvectors``.
        probs: ``(..., C)`` the probabilities behind ``I`` (softmax for categorical, sigmoid for
            bernoulli; ``None`` for gaussian).
        diagonal: ``(..., C)`` the diagonal of ``I`` (``p(1-p)``, ``s(1-s)`` or ``1/sigma2``).
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    probs: torch.Tensor | None
    diagonal: torch.Tensor
    likelihood: str

    @property
    def lambda_max(self) -> torch.Tensor:
        """``(...)`` largest eigenvalue of every row."""
        return self.eigenvalues[..., 0]

    def matrix(self) -> torch.Tensor:
        """``(..., C, C)`` the core FIM rebuilt from the eigenpairs, ``V^T diag(lam) V``."""
        V = self.eigenvectors
        return torch.einsum("...jc,...j,...jd->...cd", V, self.eigenvalues, V)

    def bounds(self) -> dict[str, torch.Tensor]:
        """Bounds on ``lambda_max`` per row (each ``(...)``), docs/math.md §7.

        Every likelihood: ``max_diag`` (largest diagonal entry, ``max_c p_c(1-p_c)`` for
        categorical) ``<= lambda_max <=`` ``trace`` (``1 - |p|^2`` for categorical). Categorical
        only, from the interlacing of the secular roots: ``p_(C-1) <= lambda_max <= p_(C)``
        (``interlace_lower``, ``interlace_upper``: the second largest and the largest
        probability).
        """
        out = {
            "max_diag": self.diagonal.max(-1).values,
            "trace": self.diagonal.sum(-1),
        }
        if self.likelihood == "categorical":
            top2 = torch.topk(self.probs, 2, dim=-1).values
            out["interlace_lower"] = top2[..., 1]
            out["interlace_upper"] = top2[..., 0]
        return out

    def check_bounds(self, rtol: float | None = None) -> torch.Tensor:
        """``(...)`` bool: whether every bound of :meth:`bounds` holds for the row.

        Args:
            rtol: slack relative to the bound, for rounding (default: 64 machine epsilons of the
                compute dtype).
        """
        if rtol is None:
            rtol = 64 * torch.finfo(self.eigenvalues.dtype).eps
        lam = self.lambda_max
        b = self.bounds()
        ok = lam >= b["max_diag"] * (1 - rtol)
        ok &= lam <= b["trace"] * (1 + rtol)
        if "interlace_lower" in b:
            ok &= lam >= b["interlace_lower"] * (1 - rtol)
            ok &= lam <= b["interlace_upper"] * (1 + rtol)
        return ok


def core_spectrum(
    logits: torch.Tensor,
    likelihood: str = "categorical",
    sigma2: float = 1.0,
    backend: str | None = None,
) -> CoreSpectrum:
    """All eigenpairs of the core FIM ``I(z)`` of every row of ``logits``.

    Categorical: the ``C - 1`` non-zero eigenpairs come from :func:`fimfast.ops.core_topk` with
    ``k = C - 1`` (the secular-equation solver, exact to rounding, ties and underflowed
    probabilities handled), and the null eigenpair ``(0, 1/sqrt(C))`` completes the basis
    (orthogonalised against the others, which matters only when probabilities underflow to 0 and
    the null space grows). Bernoulli and gaussian: the diagonal, sorted.

    Args:
        logits: ``(..., C)`` float16|bfloat16|float32|float64, ``C >= 2`` for categorical.
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
        sigma2: variance of the gaussian likelihood.
        backend: backend of :func:`fimfast.ops.core_topk`.

    Returns:
        A :class:`CoreSpectrum` in float32 (float64 for float64 logits).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = type(logits).__name__ if not isinstance(logits, torch.Tensor) else logits.dtype
        raise TypeError(f"logits must be a floating-point tensor; got {got}")
    if logits.dim() < 1 or logits.shape[-1] < 1 or logits.numel() == 0:
        raise ValueError(f"logits must have shape (..., C) with C >= 1; got {tuple(logits.shape)}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain non-finite values (NaN/Inf)")
    lead, C = tuple(logits.shape[:-1]), int(logits.shape[-1])
    dt = ops.compute_dtype(logits.dtype)
    z = logits.detach().to(dt).reshape(-1, C)
    R = z.shape[0]
    if likelihood == "categorical":
        if C < 2:
            raise ValueError(f"logits must have C >= 2 classes for categorical; got C={C}")
        p = torch.softmax(z, -1)
        lam, V = ops.core_topk(p, C - 1, solver="exact", backend=backend)
        lam, V = lam.to(dt), V.to(dt)
        # null vector: 1/sqrt(C) minus its components on the others (a no-op unless some p_c
        # underflowed to 0, where core_topk returns zero-group indicators that overlap it)
        one = torch.full((R, C), C**-0.5, dtype=dt, device=z.device)
        null = one - torch.einsum("rj,rjc->rc", torch.einsum("rjc,rc->rj", V, one), V)
        null = null / null.norm(dim=-1, keepdim=True)
        eigenvalues = torch.cat([lam, torch.zeros(R, 1, dtype=dt, device=z.device)], -1)
        eigenvectors = torch.cat([V, null.unsqueeze(1)], 1)
        probs, diag = p, p * _complement(p)
    else:
        if likelihood == "bernoulli":
            probs = torch.sigmoid(z)
            diag = probs * torch.sigmoid(-z)  # 1 - s without cancellation for large z
        else:
            if not isinstance(sigma2, (int, float)) or not sigma2 > 0:
                raise ValueError(f"sigma2 must be a number > 0; got {sigma2!r}")
            probs = None
            diag = torch.full_like(z, 1.0 / sigma2)
        eigenvalues, idx = torch.sort(diag, dim=-1, descending=True, stable=True)
        eigenvectors = torch.nn.functional.one_hot(idx, C).to(dt)
    return CoreSpectrum(
        eigenvalues=eigenvalues.reshape(*lead, C),
        eigenvectors=eigenvectors.reshape(*lead, C, C),
        probs=None if probs is None else probs.reshape(*lead, C),
        diagonal=diag.reshape(*lead, C),
        likelihood=likelihood,
    )


def _complement(p: torch.Tensor) -> torch.Tensor:
    """``1 - p`` per row, accurate for the largest probability too.

    ``1 - p_max`` cancels catastrophically when ``p_max`` is near 1 (a peaked softmax: it becomes
    exactly 0 once the others sum below half an ulp), so for that class it is the sum of the
    others instead; every other class has ``p <= 1/2`` and no cancellation.
    """
    out = 1 - p
    top = p.argmax(-1, keepdim=True)
    others = (p.scatter(-1, top, torch.zeros_like(top, dtype=p.dtype))).sum(-1, keepdim=True)
    return out.scatter(-1, top, others)
