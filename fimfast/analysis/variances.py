"""Closed-form variances of the random estimators (docs/math.md §8), per parameter.

For one draw of each estimator on a batch, per coordinate ``i`` (``v_r = dz_r/dtheta_i``,
``w_r = d^2 z_r/dtheta_i^2``, ``I_r = I(z_r)``):

* ``monte_carlo`` (Soen & Sun's Î1, one sampled label per row): ``Var = sum_r E[(g_r^T v_r)^4] -
  (v_r^T I_r v_r)^2`` with ``g_r`` the score at ``z_r`` of a label drawn from the model.
* ``hessian`` (Î2, the sampled negative Hessian diagonal ``-d^2 log p(yhat)/dtheta_i^2``):
  ``Var = sum_r w_r^T I_r w_r``. Not a fimfast estimator type; it needs second derivatives.
* ``hutchinson`` (and ``hutchinson_sqrt``, same law), ``hutchinson_dg``, ``hutchinson_rankk``
  (``hutchinson_rank1``): with ``b = (A_r v_r)_r`` stacked over rows for the factor ``A`` of the
  type, ``Var = 2 (|b|^4 - sum_k b_k^4)`` and ``E = |b|^2``.

All means and variances are of the **batch sum** with ``num_probes = 1``; ``S`` probes divide the
variance by ``S``. Everything is computed in float64 from exact per-coordinate derivatives
(:mod:`fimfast.analysis.derivatives`), so it is meant for small models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fimfast import ops
from fimfast.analysis.derivatives import DEFAULT_MAX_PARAMS, as_compute, logit_function
from fimfast.diagfim import DiagFIM
from fimfast.likelihoods import diagonal_topk
from fimfast.types import LIKELIHOODS, FIMType

__all__ = [
    "VARIANCE_TYPES",
    "EstimatorVariances",
    "draws_needed",
    "estimator_variances",
    "row_moments",
]

# estimator names understood by estimator_variances (aliases map to the same law)
VARIANCE_TYPES = (
    "monte_carlo",
    "hessian",
    "hutchinson",
    "hutchinson_sqrt",
    "hutchinson_dg",
    "hutchinson_rankk",
    "hutchinson_rank1",
    "exact",
)
_ALIASES = {"i1": "monte_carlo", "i2": "hessian"}


class EstimatorVariances(Mapping[str, DiagFIM]):
    """Variance of one draw of each requested estimator: ``{type: DiagFIM}``.

    Attributes:
        mean: ``{type: DiagFIM}`` expectation of one draw (the Fisher for the unbiased types, the
            DG upper and RANKK lower bounds for those types).
        fisher: the Fisher diagonal (EXACT) of the analysed coordinates.
        reduction: ``"sum"`` (batch sum) or ``"mean"`` (means divided by R, variances by R^2).
        rows: number of rows (samples or unmasked tokens) of the batch.
    """

    def __init__(
        self,
        variance: dict[str, DiagFIM],
        mean: dict[str, DiagFIM],
        fisher: DiagFIM,
        reduction: str,
        rows: int,
    ):
        self._var = variance
        self.mean = mean
        self.fisher = fisher
        self.reduction = reduction
        self.rows = rows

    def __getitem__(self, key: str) -> DiagFIM:
        return self._var[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._var)

    def __len__(self) -> int:
        return len(self._var)

    def __repr__(self) -> str:
        return f"EstimatorVariances(types={list(self._var)}, rows={self.rows}, {self.reduction})"

    def relative_std(self, num_probes: int = 1) -> dict[str, DiagFIM]:
        """``std / mean`` of the average of ``num_probes`` draws, per type and coordinate."""
        out = {}
        for k, var in self._var.items():
            m = self.mean[k]
            out[k] = DiagFIM(
                {n: (var[n] / num_probes).sqrt() / m[n] for n in var}, {"quantity": "rel_std"}
            )
        return out

    def draws_needed(self, eps: float, delta: float) -> dict[str, DiagFIM]:
        """Draws per type so that each coordinate is within ``eps`` relative error of its mean
        with probability ``>= 1 - delta`` (Chebyshev; see :func:`draws_needed`)."""
        return {k: draws_needed(v, self.mean[k], eps, delta) for k, v in self._var.items()}


def _core(z: torch.Tensor, likelihood: str, sigma2: float):
    """Per-row quantities: probabilities (or None) and the diagonal ``q`` of ``I``, ``(R, C)``."""
    if likelihood == "categorical":
        p = torch.softmax(z, -1)
        return p, p * (1 - p)
    if likelihood == "bernoulli":
        s = torch.sigmoid(z)
        return s, s * torch.sigmoid(-z)  # 1 - s without cancellation for large z
    return None, torch.full_like(z, 1.0 / sigma2)


def _quad(x: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor, likelihood: str):
    """``x_r^T I_r x_r`` for ``x (K, R, C)``: ``(K, R)``."""
    if likelihood == "categorical":
        return (p * x * x).sum(-1) - (p * x).sum(-1) ** 2
    return (q * x * x).sum(-1)


def _monte_carlo_variance(
    V: torch.Tensor, p: torch.Tensor, q: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """Variance of one MONTE_CARLO draw, summed over rows: ``(K,)`` from ``V`` ``(K, R, C)``."""
    if likelihood == "categorical":
        dev = V - (p * V).sum(-1, keepdim=True)  # v_c - vbar
        d2 = dev * dev
        m2 = (p * d2).sum(-1)
        return ((p * d2 * d2).sum(-1) - m2 * m2).sum(-1)
    # independent outputs X_c (score entries) with variance q_c and fourth moment
    # mu4_c: E[(sum a X)^4] = sum a^4 mu4 + 3((sum a^2 q)^2 - sum a^4 q^2)
    a2 = V * V
    m2 = (q * a2).sum(-1)
    if likelihood == "bernoulli":
        mu4 = q * (1 - 3 * q)
    else:
        mu4 = 3 * q * q
    fourth = (a2 * a2 * mu4).sum(-1) + 3 * (m2 * m2 - (a2 * a2 * q * q).sum(-1))
    return (fourth - m2 * m2).sum(-1)


def row_moments(
    V: torch.Tensor,
    z: torch.Tensor,
    likelihood: str = "categorical",
    sigma2: float = 1.0,
    W: torch.Tensor | None = None,
    types: Sequence[str] = ("monte_carlo", "hutchinson"),
    top_k: int = 2,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and variance of one draw per type, summed over rows, for ``K`` coordinates.

    Args:
        V: ``(K, R, C)`` first derivatives ``dz_r/dtheta_i`` of the ``K`` coordinates.
        z: ``(R, C)`` logits.
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
        sigma2: variance of the gaussian likelihood.
        W: ``(K, R, C)`` second derivatives (needed by ``hessian``).
        types: names from :data:`VARIANCE_TYPES` (canonical, no aliases).
        top_k: ``k`` of ``hutchinson_rankk``.
        eig: ``(lam (R, k), V (R, k, C))`` top-k eigenpairs for ``hutchinson_rankk`` (computed
            here when ``None``; ``hutchinson_rank1`` always uses the first pair).

    Returns:
        ``{type: (mean (K,), variance (K,))}`` in float64.
    """
    V = as_compute(V)
    z = as_compute(z)
    p, q = _core(z, likelihood, sigma2)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fisher = _quad(V, p, q, likelihood).sum(-1)

    def hutch(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = b.reshape(b.shape[0], -1)  # (K, R*m)
        b2 = b * b
        e = b2.sum(-1)
        return e, 2 * (e * e - (b2 * b2).sum(-1))

    for t in types:
        if t == "exact":
            out[t] = (fisher, torch.zeros_like(fisher))
        elif t == "monte_carlo":
            out[t] = (fisher, _monte_carlo_variance(V, p, q, likelihood))
        elif t == "hessian":
            if W is None:
                raise ValueError("W (second derivatives) is required for type 'hessian'")
            out[t] = (fisher, _quad(as_compute(W), p, q, likelihood).sum(-1))
        elif t in ("hutchinson", "hutchinson_sqrt"):
            if likelihood == "categorical":
                b = p.sqrt() * (V - (p * V).sum(-1, keepdim=True))
            else:
                b = q.sqrt() * V
            out[t] = hutch(b)
        elif t == "hutchinson_dg":
            out[t] = hutch((p if likelihood == "categorical" else q).sqrt() * V)
        elif t in ("hutchinson_rankk", "hutchinson_rank1"):
            k = 1 if t == "hutchinson_rank1" else top_k
            e = eig if eig is not None else _topk(z, likelihood, sigma2, k)
            lam, vec = e[0][:, :k], e[1][:, :k]
            sl = lam.to(V.dtype).clamp_min(0).sqrt()
            b = torch.einsum("rkc,irc->irk", vec.to(V.dtype), V) * sl
            out[t] = hutch(b)
        else:
            raise ValueError(f"types: unknown type {t!r}; valid: {VARIANCE_TYPES}")
    return out


def _topk(z: torch.Tensor, likelihood: str, sigma2: float, k: int):
    if likelihood == "categorical":
        return ops.core_topk(torch.softmax(z, -1), k, solver="exact", backend="torch")
    return diagonal_topk(z, likelihood, sigma2, k)


def _canonical_types(types: Sequence[str] | str) -> list[str]:
    if isinstance(types, (str, FIMType)):
        types = [types]
    out = []
    for t in types:
        key = t.value if isinstance(t, FIMType) else str(t).strip().lower()
        key = _ALIASES.get(key, key)
        if key not in VARIANCE_TYPES:
            try:  # FIMType names like "HUTCHINSON_DG"
                key = FIMType.parse(key).value
            except ValueError:
                pass
        if key == "empirical":
            raise ValueError(
                "types: 'empirical' is deterministic given the labels (variance 0) and has a "
                "different mean; it is not analysed here"
            )
        if key not in VARIANCE_TYPES:
            raise ValueError(f"types must be among {VARIANCE_TYPES} (or 'I1'/'I2'); got {t!r}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("types must name at least one estimator")
    return out


def _check_options(likelihood: str, reduction: str, top_k: int, sigma2: float) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1; got {top_k!r}")
    if not isinstance(sigma2, (int, float)) or not sigma2 > 0:
        raise ValueError(f"sigma2 must be a number > 0; got {sigma2!r}")


def _coordinates(lf, params, max_params: int) -> torch.Tensor:
    """The coordinates to analyse; raises when there are more than ``max_params``."""
    coords = lf.coordinates(params)
    if coords.numel() > max_params:
        raise ValueError(
            f"estimator_variances forms exact per-coordinate derivatives and is meant for small "
            f"models: {coords.numel()} coordinates to analyse exceed max_params={max_params}. "
            "Analyse fewer parameters with params=[...] or raise max_params (cost grows as "
            "coordinates x rows x model size)"
        )
    return coords


def _unflatten(flat: torch.Tensor, names, shapes, meta: dict) -> DiagFIM:
    """The flat vector of the analysed coordinates as a DiagFIM keyed by parameter name."""
    out, i = {}, 0
    for n in names:
        k = math.prod(shapes[n])
        out[n] = flat[i : i + k].reshape(shapes[n])
        i += k
    return DiagFIM(out, meta)


def _moments_of(lf, coords, kinds: list[str], likelihood, sigma2, top_k, chunk):
    """Means and variances of each type, and the Fisher, for the coordinates ``coords`` (flat
    float64 vectors, summed over rows), in passes of ``chunk`` coordinates."""
    z = as_compute(lf.z)
    eig = None
    if "hutchinson_rankk" in kinds or "hutchinson_rank1" in kinds:
        eig = _topk(z, likelihood, sigma2, top_k if "hutchinson_rankk" in kinds else 1)
    mean_flat = {k: torch.zeros(coords.numel(), dtype=torch.float64) for k in kinds}
    var_flat = {k: torch.zeros(coords.numel(), dtype=torch.float64) for k in kinds}
    fisher_flat = torch.zeros(coords.numel(), dtype=torch.float64)
    pos = 0
    for _, V, W in lf.derivatives(coords, second="hessian" in kinds, chunk=chunk):
        K = V.shape[0]
        mom = row_moments(V, z, likelihood, sigma2, W, kinds + ["exact"], top_k, eig)
        for k in kinds:
            mean_flat[k][pos : pos + K] = mom[k][0].cpu()
            var_flat[k][pos : pos + K] = mom[k][1].cpu()
        fisher_flat[pos : pos + K] = mom["exact"][0].cpu()
        pos += K
    return mean_flat, var_flat, fisher_flat


def estimator_variances(
    model: torch.nn.Module,
    batch: Any,
    likelihood: str = "categorical",
    types: Sequence[str] = (
        "monte_carlo",
        "hessian",
        "hutchinson",
        "hutchinson_dg",
        "hutchinson_rankk",
    ),
    top_k: int = 2,
    sigma2: float = 1.0,
    reduction: str = "sum",
    params: Sequence[str] | None = None,
    max_params: int = DEFAULT_MAX_PARAMS,
    forward_fn=None,
    ignore_index: int = -100,
    chunk: int | None = None,
) -> EstimatorVariances:
    """Per-parameter variance of one draw of each random estimator on ``batch`` (docs/math.md §8).

    Exact closed forms from per-coordinate derivatives of the logits: first derivatives for every
    type, and second derivatives ``d^2 z/dtheta_i^2`` for ``hessian`` (Î2), by
    forward-over-forward ``torch.func.jvp`` one coordinate at a time (vectorised). **Meant for
    small models**: the cost is about ``P_analysed * R`` forward passes' worth of work over the
    whole model (``P_analysed`` = coordinates of ``params``), so above ``max_params`` analysed
    coordinates it raises instead of running for hours; analyse a few layers with ``params``.

    Args:
        model: the network (deterministic: ``model.eval()`` if it has dropout).
        batch: a batch as for :class:`fimfast.DiagFisher` (labels are not needed).
        likelihood: ``categorical``, ``bernoulli`` or ``gaussian``.
        types: any of ``monte_carlo`` (Î1; alias ``I1``), ``hessian`` (Î2; alias ``I2``),
            ``hutchinson``, ``hutchinson_sqrt``, ``hutchinson_dg``, ``hutchinson_rankk``,
            ``hutchinson_rank1``, ``exact`` (variance 0).
        top_k: ``k`` of ``hutchinson_rankk``.
        sigma2: variance of the gaussian likelihood.
        reduction: ``"sum"`` (the batch sum, as ``reduction="sum"`` of the estimators) or
            ``"mean"`` (means divided by the row count R, variances by R^2).
        params: names of the parameters to analyse (default: every trainable parameter).
        max_params: the most coordinates analysed before raising ``ValueError``.
        forward_fn: ``forward_fn(model, batch) -> output`` for other batch layouts.
        ignore_index: label of tokens left out (token-level outputs).
        chunk: coordinates per vectorised pass (default: from ``FIMFAST_MEMORY_BUDGET_MB``).

    Returns:
        :class:`EstimatorVariances`: ``{type: DiagFIM of variances}`` (float64, keyed by the
        analysed parameter names), with ``.mean`` and ``.fisher``.
    """
    _check_options(likelihood, reduction, top_k, sigma2)
    kinds = _canonical_types(types)
    lf = logit_function(model, batch, likelihood, ignore_index, forward_fn)
    R, C = lf.z.shape
    kmax = C - 1 if likelihood == "categorical" else C
    if "hutchinson_rankk" in kinds and top_k > kmax:
        raise ValueError(f"top_k must be <= {kmax} for C={C} ({likelihood}); got {top_k}")
    coords = _coordinates(lf, params, max_params)
    mean_flat, var_flat, fisher_flat = _moments_of(
        lf, coords, kinds, likelihood, sigma2, top_k, chunk
    )
    if reduction == "mean":
        for k in kinds:
            mean_flat[k] /= R
            var_flat[k] /= R * R
        fisher_flat /= R
    names = [n for n in lf.names if params is None or n in params]
    shapes = dict(zip(lf.names, lf.shapes))
    meta = {"reduction": reduction, "rows": R, "likelihood": likelihood}

    def to_fim(flat: torch.Tensor, quantity: str) -> DiagFIM:
        return _unflatten(flat, names, shapes, {"quantity": quantity, **meta})

    return EstimatorVariances(
        {k: to_fim(var_flat[k], f"variance:{k}") for k in kinds},
        {k: to_fim(mean_flat[k], f"mean:{k}") for k in kinds},
        to_fim(fisher_flat, "exact"),
        reduction,
        R,
    )


def draws_needed(variance: Any, mean: Any, eps: float, delta: float) -> Any:
    """Draws ``S`` so that the mean of ``S`` draws is within ``eps`` relative error of ``mean``
    with probability at least ``1 - delta``, by Chebyshev: ``S >= Var / (delta eps^2 F^2)``.

    Args:
        variance: variance of one draw: a float, a tensor or a :class:`DiagFIM`.
        mean: the expectation ``F`` of one draw, of the same kind and shape.
        eps: relative error, ``> 0``.
        delta: failure probability, ``0 < delta < 1``.

    Returns:
        The smallest integer ``S >= 1`` per entry (float tensor, ``inf`` where ``F = 0`` but the
        variance is not), in the kind of ``variance``.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number with 0 < delta < 1; got {delta!r}")
    if isinstance(variance, DiagFIM):
        if not isinstance(mean, Mapping):
            raise TypeError(f"mean must be a DiagFIM like variance; got {type(mean).__name__}")
        missing = [k for k in variance if k not in mean]
        if missing:
            raise ValueError(f"mean is missing parameters {missing[:5]}")
        d = {k: _draws(variance[k], mean[k], eps, delta) for k in variance}
        return DiagFIM(d, {"quantity": "draws_needed", "eps": eps, "delta": delta})
    scalar = not isinstance(variance, torch.Tensor) and not isinstance(mean, torch.Tensor)
    out = _draws(torch.as_tensor(variance), torch.as_tensor(mean), eps, delta)
    return float(out) if scalar else out


def _draws(var: torch.Tensor, mean: torch.Tensor, eps: float, delta: float) -> torch.Tensor:
    var = var.to(torch.float64)
    mean = mean.to(torch.float64)
    if bool((var < 0).any()):
        raise ValueError("variance must be >= 0")
    s = torch.ceil(var / (delta * eps * eps * mean * mean))
    s = torch.where(var == 0, torch.ones_like(s), s)  # a constant estimator: one draw
    return s.clamp_min(1)
