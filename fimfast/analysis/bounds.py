"""The deterministic sandwich ``RANKK <= EXACT <= DG`` per parameter (docs/math.md §6).

* ``upper`` (the expectation of HUTCHINSON_DG): ``sum_r diag(J_r^T diag(p_r) J_r)``; for the
  diagonal core FIMs (bernoulli, gaussian) it equals EXACT.
* ``exact``: ``sum_r diag(J_r^T I(z_r) J_r)``.
* ``lower`` (the expectation of HUTCHINSON_RANKK): ``sum_r diag(J_r^T I_k(z_r) J_r)`` with
  ``I_k`` the top-``k`` part of ``I``.

Each is a sum of squared per-row gradients of a few columns ``u`` at the logits (``sqrt(p_c) e_c``;
the columns of a factor of ``I``; ``sqrt(lam_j) v_j``), computed exactly by the per-sample engine
(:func:`fimfast.persample.accumulate_columns`); no random numbers and no size limit beyond its
cost of one backward per (row, column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fimfast import batch as batchlib
from fimfast import chunks, likelihoods, ops, persample
from fimfast.diagfim import DiagFIM
from fimfast.dtypes import compute_dtype
from fimfast.estimator import trainable_parameters
from fimfast.types import LIKELIHOODS, Options

__all__ = ["FisherBounds", "bounds"]


@dataclass
class FisherBounds:
    """``lower <= exact <= upper`` elementwise (each a :class:`DiagFIM`).

    Attributes:
        lower: expectation of HUTCHINSON_RANKK with ``top_k`` eigenpairs.
        exact: the Fisher diagonal.
        upper: expectation of HUTCHINSON_DG.
        top_k: ``k`` of ``lower``.
    """

    lower: DiagFIM
    exact: DiagFIM
    upper: DiagFIM
    top_k: int

    def holds(self, rtol: float = 1e-5, atol: float | None = None) -> bool:
        """Whether ``lower <= exact <= upper`` everywhere, up to ``rtol * upper + atol``.

        ``atol`` defaults to 16 machine epsilons of the largest entry of ``upper``: coordinates
        whose gradient vanishes in exact arithmetic (an attention key bias) carry squared
        rounding noise of that size in every bound.
        """
        if atol is None:
            top = max(float(u.abs().max()) for u in self.upper.values())
            dt = next(iter(self.upper.values())).dtype
            atol = 16 * torch.finfo(dt).eps * top
        for n in self.exact:
            slack = rtol * self.upper[n].abs() + atol
            if bool((self.lower[n] > self.exact[n] + slack).any()):
                return False
            if bool((self.exact[n] > self.upper[n] + slack).any()):
                return False
        return True

    def as_dict(self) -> dict[str, DiagFIM]:
        """``{"lower": ..., "exact": ..., "upper": ...}``."""
        return {"lower": self.lower, "exact": self.exact, "upper": self.upper}


def bounds(
    model: torch.nn.Module,
    batch: Any,
    likelihood: str = "categorical",
    top_k: int = 2,
    sigma2: float = 1.0,
    reduction: str = "sum",
    forward_fn=None,
    ignore_index: int = -100,
) -> FisherBounds:
    """Exact ``RANKK <= EXACT <= DG`` diagonals of ``model`` on ``batch``.

    Args:
        model: the network.
        batch: a batch as for :class:`fimfast.DiagFisher` (labels are not needed).
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
        top_k: eigenpairs of the lower bound (``1 <= top_k <= C - 1`` for categorical).
        sigma2: variance of the gaussian likelihood.
        reduction: ``"sum"`` over rows or ``"mean"``.
        forward_fn: ``forward_fn(model, batch) -> output`` for other batch layouts.
        ignore_index: label of tokens left out (token-level outputs).

    Returns:
        :class:`FisherBounds`, float32 (float64 for a float64 model).
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1; got {top_k!r}")
    opts = Options(likelihood=likelihood, sigma2=sigma2, backend="torch")
    opts.validate()
    names, params = trainable_parameters(model)
    if forward_fn is None:
        inputs, labels, mask = batchlib.split(batch)
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    else:
        labels, mask = batchlib.labels_of(batch)
        out = forward_fn(model, batch)
    rows = batchlib.rows(batchlib.logits_of(out), labels, mask, likelihood, ignore_index, False)
    flat = rows.flat
    R, C = flat.shape
    kmax = C - 1 if likelihood == "categorical" else C
    if top_k > kmax:
        raise ValueError(f"top_k must be <= {kmax} for C={C} ({likelihood}); got {top_k}")
    dt = compute_dtype(flat.dtype)
    z = flat.detach().to(dt)
    chunk = chunks.generic_columns(R, C, params, C)

    def run(columns) -> list[torch.Tensor]:
        acc = [
            torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device) for p in params
        ]
        persample.accumulate_columns(flat, params, columns, acc)
        if reduction == "mean":
            acc = [a / R for a in acc]
        return acc

    exact = run(likelihoods.exact_columns(flat, opts, chunk))
    if likelihood == "categorical":
        sp = torch.softmax(z, -1).sqrt()
        eye = torch.eye(C, dtype=dt, device=z.device)
        upper = run([sp.transpose(0, 1).unsqueeze(-1) * eye.unsqueeze(1)])  # (C, R, C)
        lam, vec = ops.core_topk(torch.softmax(z, -1), top_k, solver="exact", backend="torch")
    else:
        upper = [e.clone() for e in exact]  # the core FIM is diagonal: DG = EXACT
        lam, vec = likelihoods.diagonal_topk(z, likelihood, sigma2, top_k)
    cols = (lam.clamp_min(0).sqrt().unsqueeze(-1) * vec).transpose(0, 1)  # (k, R, C)
    lower = run([cols])
    meta = {"likelihood": likelihood, "reduction": reduction, "rows": R, "top_k": top_k}

    def fim(vals: list[torch.Tensor], q: str) -> DiagFIM:
        return DiagFIM(dict(zip(names, vals)), {**meta, "quantity": q})

    return FisherBounds(fim(lower, "rankk"), fim(exact, "exact"), fim(upper, "dg"), top_k)
