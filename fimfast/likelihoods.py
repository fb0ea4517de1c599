"""Output-side factors of every estimator, per likelihood (docs/math.md §3 and §5).

Each estimator is ``sum over rows and columns of (J_r^T u)^2`` for some vectors ``u`` at the logits:

* HUTCHINSON family: ``u = dh/dz`` of one random scalar ``h`` per probe, summed over the rows of the
  batch (one backward per probe, no per-sample gradients);
* per-sample types: columns ``u`` whose squared per-row gradients add up to the estimate (EXACT: the
  ``C`` columns of a factor ``A`` with ``A^T A = I(z)``; EMPIRICAL: the observed score; MONTE_CARLO:
  the sampled score, ``num_probes`` draws scaled by ``1/sqrt(S)``).

Random numbers come from the counter-based generator of :mod:`fimfast.ops.rng`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fimfast import ops
from fimfast.dtypes import compute_dtype
from fimfast.finite import all_finite
from fimfast.ops import rng
from fimfast.ops.softmax_rest import softmax_rest
from fimfast.types import FIMType, Options

_PROBE_MODE = {
    FIMType.HUTCHINSON: "hutchinson",
    FIMType.HUTCHINSON_SQRT: "sqrt",
    FIMType.HUTCHINSON_DG: "dg",
}


def effective_top_k(fim_type: FIMType, opts: Options) -> int:
    """``top_k`` as used by ``fim_type`` (RANK1 forces 1)."""
    return 1 if fim_type == FIMType.HUTCHINSON_RANK1 else opts.top_k


def check_top_k(fim_type: FIMType, opts: Options, C: int) -> None:
    """Raise when ``top_k`` exceeds what the core FIM has (``C - 1`` non-zero eigenvalues)."""
    if fim_type not in (FIMType.HUTCHINSON_RANKK, FIMType.HUTCHINSON_RANK1):
        return
    k = effective_top_k(fim_type, opts)
    kmax = C - 1 if opts.likelihood == "categorical" else C
    if k > kmax:
        raise ValueError(
            f"fim_opts['top_k'] must be <= {kmax} for C={C} classes "
            f"({opts.likelihood} core FIM); got {k}"
        )


def probe_factor(
    flat: torch.Tensor, fim_type: FIMType, opts: Options, seed: int, offset: int
) -> torch.Tensor:
    """``u = dh/dz`` of the HUTCHINSON family for every probe: ``(S, R, C)``.

    For HUTCHINSON_SQRT it is the coefficient ``w = sqrt(p) * xi`` of ``log_softmax`` instead (the
    engine back-propagates ``sum w * log_softmax(z)``, whose gradient at ``z`` equals HUTCHINSON's
    ``u`` for the same probes).
    """
    z = flat.detach()
    S = opts.num_probes
    lk = opts.likelihood
    if fim_type in (FIMType.HUTCHINSON_RANKK, FIMType.HUTCHINSON_RANK1):
        k = effective_top_k(fim_type, opts)
        if lk == "categorical":
            p = torch.softmax(z.to(compute_dtype(z.dtype)), dim=-1)
            eig = ops.core_topk(
                p, k, solver=opts.rankk_solver, iters=opts.lr_power_itrs, backend=opts.backend
            )
        else:
            eig = diagonal_topk(z, lk, opts.sigma2, k)
        return ops.probe_logit_grad(z, "rankk", seed, offset, S, eig=eig, backend=opts.backend)
    if lk == "categorical":
        mode = _PROBE_MODE[fim_type]
    else:  # diagonal core FIM: HUTCHINSON and DG coincide
        mode = lk
    return ops.probe_logit_grad(z, mode, seed, offset, S, sigma2=opts.sigma2, backend=opts.backend)


def diagonal_topk(z: torch.Tensor, likelihood: str, sigma2: float, k: int):
    """Top-k eigenpairs of a diagonal core FIM: its k largest entries (ties by lower class
    index) and unit vectors."""
    dt = compute_dtype(z.dtype)
    if likelihood == "bernoulli":
        d = bernoulli_core(z.to(dt))
    else:
        d = torch.full(z.shape, 1.0 / sigma2, dtype=dt, device=z.device)
    # ties by lower class index (torch.topk's order among equal values is unspecified: it
    # differs with C and the device, and the gaussian core FIM is all ties)
    idx = torch.sort(d, dim=-1, descending=True, stable=True).indices[..., :k]
    lam = torch.gather(d, -1, idx)
    vec = torch.nn.functional.one_hot(idx, z.shape[-1]).to(dt)
    return lam, vec


def diag_core(z: torch.Tensor, likelihood: str, sigma2: float) -> torch.Tensor:
    """Diagonal of the core FIM, ``(R, C)``: p(1-p), s(1-s) or 1/sigma2."""
    dt = compute_dtype(z.dtype)
    z = z.detach().to(dt)
    if likelihood == "categorical":
        soft = softmax_rest(z)  # 1 - p exact at a confident row's leading class
        return soft.p * soft.one_minus()
    if likelihood == "bernoulli":
        return bernoulli_core(z)
    return torch.full_like(z, 1.0 / sigma2)


def bernoulli_core(z: torch.Tensor) -> torch.Tensor:
    """``s (1 - s)`` with ``s = sigmoid(z)``, as ``sigmoid(z) sigmoid(-z)``: accurate in both tails
    (``1 - s`` cancels to 0 in float32 from ``z`` of about 17 on)."""
    return torch.sigmoid(z) * torch.sigmoid(-z)


def exact_columns(flat: torch.Tensor, opts: Options, chunk: int) -> Iterator[torch.Tensor]:
    """Columns of a factor ``A`` of ``I(z)`` (``A^T A = I``), ``chunk`` classes at a time.

    Yields ``(K, R, C)`` tensors: column ``c`` of row ``r`` is ``sqrt(p_c) (e_c - p)``
    (categorical), ``sqrt(s_c (1 - s_c)) e_c`` (bernoulli) or ``e_c / sigma`` (gaussian).
    """
    dt = compute_dtype(flat.dtype)
    z = flat.detach() if flat.requires_grad else flat
    if z.dtype != dt:
        z = z.to(dt)
    R, C = z.shape
    lk = opts.likelihood
    if lk == "categorical":
        soft = softmax_rest(z)
        p = soft.p
        sp = torch.sqrt(p)
        om = soft.one_minus()  # 1 - p, exact at a confident row's leading class
    elif lk == "bernoulli":
        sp = 0.5 / torch.cosh(0.5 * z)  # sqrt(s (1 - s)), accurate in both tails
    else:
        sp = torch.full_like(z, 1.0 / math.sqrt(opts.sigma2))
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        K = c1 - c0
        cols = torch.zeros(K, R, C, dtype=dt, device=z.device)
        ar = torch.arange(K, device=z.device)
        cols[ar, :, c0 + ar] = sp[:, c0:c1].transpose(0, 1)
        if lk == "categorical":
            cols -= sp[:, c0:c1].transpose(0, 1).unsqueeze(-1) * p.unsqueeze(0)
            cols[ar, :, c0 + ar] = (sp * om)[:, c0:c1].transpose(0, 1)
        yield cols


def score_columns(
    flat: torch.Tensor,
    labels: torch.Tensor | None,
    fim_type: FIMType,
    opts: Options,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Score columns of EMPIRICAL (``(1, R, C)``) or MONTE_CARLO (``(S, R, C)``, scaled 1/sqrt(S)).

    The score is ``d log p(y | z) / dz``: ``e_y - p`` (categorical), ``y - s`` (bernoulli),
    ``(y - z) / sigma2`` (gaussian), with the observed ``y`` or one drawn from the model.
    """
    dt = compute_dtype(flat.dtype)
    z = flat.detach() if flat.requires_grad else flat
    if z.dtype != dt:
        z = z.to(dt)
    R, C = z.shape
    lk = opts.likelihood
    if fim_type == FIMType.EMPIRICAL:
        if lk == "categorical":
            return ops.probe_logit_grad(
                z, "empirical", seed, offset, 1, labels=labels, backend=opts.backend
            )
        y = observed(labels, dt, lk)
        if lk == "bernoulli":  # y (1 - s) - (1 - y) s, 1 - s as sigmoid(-z): exact in both tails
            return (y * torch.sigmoid(-z) - (1 - y) * torch.sigmoid(z)).unsqueeze(0)
        return ((y - z) / opts.sigma2).unsqueeze(0)
    S = opts.num_probes
    if lk == "categorical":
        cols = ops.probe_logit_grad(z, "mc", seed, offset, S, backend=opts.backend)
    elif lk == "bernoulli":
        s = torch.sigmoid(z)
        u = rng.uniform(seed, offset, (S, R, C), dt, z.device)
        cols = torch.where(u < s, torch.sigmoid(-z), -s)  # 1 - s without cancellation
    else:
        # Box-Muller on two uniforms per element: counters offset + i and offset + S*R*C + i
        n = S * R * C
        u1 = rng.uniform(seed, offset, (S, R, C), dt, z.device)
        u2 = rng.uniform(seed, offset + n, (S, R, C), dt, z.device)
        eps = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)
        cols = eps / math.sqrt(opts.sigma2)
    return cols if S == 1 else cols / math.sqrt(S)


def observed(labels: torch.Tensor, dt: torch.dtype, likelihood: str) -> torch.Tensor:
    """The observed targets of a ``bernoulli`` or ``gaussian`` EMPIRICAL step in ``dt``, refused
    when one is NaN/Inf (its score, and so the diagonal of every parameter, would be: a missing
    regression target written as NaN) or, for ``bernoulli``, outside ``[0, 1]`` (not a
    probability: class indices given to a multi-label head)."""
    y = labels.to(dt)
    if not all_finite([y]):
        raise ValueError(
            f"labels: {int((~torch.isfinite(y)).sum())} non-finite target(s) (NaN/Inf) for the "
            f"{likelihood} likelihood; EMPIRICAL needs every observed target (leave rows "
            "without one out of the batch); the step was not taken"
        )
    if likelihood == "bernoulli" and not bool(((y >= 0) & (y <= 1)).all()):
        lo, hi = float(y.min()), float(y.max())
        raise ValueError(
            f"labels: bernoulli targets must be probabilities in [0, 1]; got values in "
            f"[{lo:g}, {hi:g}]; the step was not taken"
        )
    return y


def counters_used(S: int, R: int, C: int) -> int:
    """Counters one step may consume (an upper bound over all types): the offset advance."""
    return 2 * S * R * C
