"""A float64 oracle of every step of HUTCHINSON_SQRT, HUTCHINSON_RANKK and HUTCHINSON_RANK1
(and of the other HUTCHINSON types, with every likelihood), and the exact expectations of the
HUTCHINSON family for the sandwich of docs/math.md §6.

The oracle forms each step's diagonal from the model as it is at that step: every valid row's
Jacobian (:func:`jacobian_rows`, the whole batch's graph), then the output-side factor of the
type with the signs the estimator drew (the counter-based generator, :mod:`fimfast.ops.rng`, at
the estimator's seed and offset), built here from its definition (docs/math.md §5, §7):

* HUTCHINSON, HUTCHINSON_SQRT: ``u = sqrt(p) o xi - p (sqrt(p)^T xi)`` (the same law; SQRT reaches
  it through ``log_softmax``); HUTCHINSON_DG: ``sqrt(p) o xi``; bernoulli: ``sqrt(s(1-s)) o xi``;
  gaussian: ``xi / sigma``.
* RANKK: ``u = sum_{j<=k} xi_j sqrt(lam_j) v_j`` over the top ``k`` eigenpairs of the core FIM,
  eigenvectors signed so their largest-magnitude entry is positive (the first one, in class
  order, among entries within 64 ulps of it). Categorical, ``rankk_solver="exact"``: from
  ``mpmath.eigsy`` at 400 digits on ``diag(p) - p p^T`` of the exact softmax of the row's
  logits (in float64 a row peaked to ``1 - 1e-238`` has lost its small eigenvalues: ``1 - p``
  rounds to 0, where the library's secular solver still gets them). An eigenvalue repeated
  among the top ``k + 1`` leaves the eigenvectors a free choice of the solver (tied
  probabilities): there the solver's choice (float64 ``core_topk``) is taken after checking it
  is an orthonormal eigenbasis of the exact matrix. ``rankk_solver="power"``: ``lr_power_itrs``
  power iterations from ``e_top - 1/C``, products ``p o v - p (p^T v)``, Gram-Schmidt deflation
  (the paper's solver), then Gram-Schmidt twice more and the Rayleigh quotients. Bernoulli and
  gaussian: the ``k`` largest diagonal entries (ties by lower class index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpmath as mp
import torch
from adversarial import jacobian_rows, stepped
from oracle import core_matrix

import fimfast
from fimfast.ops import rng
from fimfast.ops.torch_ref import core_topk_torch

RANDOM = ("hutchinson", "hutchinson_sqrt", "hutchinson_dg", "hutchinson_rankk",
          "hutchinson_rank1")
# digits of the oracle's eigen-decomposition, and eigenvalues closer than 10**-TIE_DIGITS of the
# largest count as one repeated eigenvalue
DPS, TIE_DIGITS = 400, 30


# ------------------------------------------------------------------------ core FIMs, top-k
def core(z: torch.Tensor, likelihood: str = "categorical", sigma2: float = 1.0) -> torch.Tensor:
    """``(R, C, C)`` core FIMs of the rows ``z`` (float64)."""
    return core_matrix(z, likelihood, sigma2)


def sign_rule(v: torch.Tensor) -> torch.Tensor:
    """``v`` (..., C) with each vector's first near-largest entry (64 ulps) made positive."""
    mag = v.abs()
    near = mag >= mag.amax(-1, keepdim=True) * (1 - 64 * torch.finfo(v.dtype).eps)
    first = torch.argmax(near.to(torch.int8), -1, keepdim=True)
    s = torch.sign(torch.gather(v, -1, first))
    return v * torch.where(s == 0, torch.ones_like(s), s)


def _power(p: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's power iteration with Gram-Schmidt deflation, in float64."""
    R, C = p.shape
    lam, vec = torch.zeros(R, k, dtype=p.dtype), torch.zeros(R, k, C, dtype=p.dtype)
    for r in range(R):
        top = sorted(range(C), key=lambda c: (-float(p[r, c]), c))[:k]
        v = [torch.eye(C, dtype=p.dtype)[t] - 1.0 / C for t in top]
        def M(x, q=p[r]):  # the paper's matrix-vector product p o x - p (p^T x)
            return q * x - q * (q @ x)
        for _ in range(iters):
            w = [M(x) for x in v]
            out = []
            for x in w:
                for y in out:
                    x = x - (x @ y) * y
                out.append(x / max(float(x.norm()), torch.finfo(p.dtype).tiny))
            v = out
        out = []  # the finishing step: Gram-Schmidt twice more, then the Rayleigh quotients
        for x in v:
            for y in out + out:
                x = x - (x @ y) * y
            out.append(x / max(float(x.norm()), torch.finfo(p.dtype).tiny))
        for j, x in enumerate(out):
            vec[r, j], lam[r, j] = x, x @ M(x)
    return lam, sign_rule(vec)


def top_k_pairs(z: torch.Tensor, k: int, likelihood: str = "categorical", sigma2: float = 1.0,
                solver: str = "exact", iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam (R, k), V (R, k, C))``: the top ``k`` eigenpairs of the core FIM of every row, as
    RANKK defines them (module docstring)."""
    R, C = z.shape
    if likelihood != "categorical":
        d = torch.diagonal(core(z, likelihood, sigma2), dim1=-2, dim2=-1)
        lam, vec = torch.zeros(R, k, dtype=z.dtype), torch.zeros(R, k, C, dtype=z.dtype)
        for r in range(R):
            top = sorted(range(C), key=lambda c: (-float(d[r, c]), c))[:k]
            for j, c in enumerate(top):
                lam[r, j], vec[r, j, c] = d[r, c], 1.0
        return lam, vec
    if solver == "power":
        return _power(torch.softmax(z, -1), k, iters)
    lam, vec = torch.zeros(R, k, dtype=z.dtype), torch.zeros(R, k, C, dtype=z.dtype)
    for r in range(R):
        lam[r], vec[r] = _exact_pairs(z[r], k)
    return lam, sign_rule(vec)


def _exact_pairs(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` eigenpairs of the core FIM of the logits ``z`` (C,), from ``mpmath.eigsy``
    at ``DPS`` digits on the matrix of the exact softmax of ``z`` (a float64 ``diag(p) - p p^T``
    loses a peaked row's small eigenvalues entirely: ``1 - p_top`` rounds away). A repeated
    eigenvalue among the top ``k + 1`` (tied probabilities) leaves the vectors a free choice:
    there the solver's (float64 ``core_topk``) are checked to be an orthonormal eigenbasis of
    the exact matrix and taken."""
    C = z.numel()
    with mp.workdps(DPS):
        e = [mp.exp(mp.mpf(float(x)) - mp.mpf(float(z.max()))) for x in z]
        tot = mp.fsum(e)
        p = [x / tot for x in e]
        M = mp.matrix(C, C)
        for i in range(C):
            for j in range(C):
                M[i, j] = (p[i] if i == j else 0) - p[i] * p[j]
        ev, Q = mp.eigsy(M)  # ascending
        order = list(range(C - 1, -1, -1))[: k + 1]
        top = ev[order[0]]
        tied = any(abs(ev[a] - ev[b]) <= mp.mpf(10) ** -TIE_DIGITS * top
                   for a, b in zip(order[:-1], order[1:]))
        lam = torch.tensor([float(ev[j]) for j in order[:k]], dtype=torch.float64)
        if not tied or top < mp.mpf("1e-300"):  # below float64's range: u under 1e-150
            vec = torch.tensor([[float(Q[c, j]) for c in range(C)] for j in order[:k]],
                               dtype=torch.float64)
            return lam, vec
        pf = torch.tensor([float(x) for x in p], dtype=torch.float64)
        _, vs = core_topk_torch(pf.unsqueeze(0), k)
        for j in range(k):
            v = [mp.mpf(float(x)) for x in vs[0, j]]
            res = max(abs(mp.fsum(M[c, d] * v[d] for d in range(C)) - ev[order[j]] * v[c])
                      for c in range(C))
            assert res <= mp.mpf("1e-13") * top, "the solver's tie vectors: not eigenvectors"
        gram = vs[0] @ vs[0].T
        assert float((gram - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-13
        return lam, vs[0]


# ------------------------------------------------------------------------------- factors
def factor(z: torch.Tensor, fim_type: str, seed: int, offset: int, num_probes: int = 1,
           likelihood: str = "categorical", sigma2: float = 1.0, top_k: int = 2,
           solver: str = "exact", iters: int = 30) -> torch.Tensor:
    """``(S, R, C)`` float64 output-side factors ``u = dh/dz`` of one step of ``fim_type`` on
    the rows ``z``, with the signs of the generator at ``seed``, ``offset``."""
    S, (R, C) = int(num_probes), z.shape
    if fim_type in ("hutchinson_rankk", "hutchinson_rank1"):
        k = 1 if fim_type == "hutchinson_rank1" else top_k
        lam, vec = top_k_pairs(z, k, likelihood, sigma2, solver, iters)
        xi = rng.rademacher(seed, offset, (S, R, k), torch.float64)
        return torch.einsum("srk,rk,rkc->src", xi, lam.clamp_min(0).sqrt(), vec)
    xi = rng.rademacher(seed, offset, (S, R, C), torch.float64)
    if likelihood == "gaussian":
        return xi / sigma2 ** 0.5
    if likelihood == "bernoulli":
        s = torch.sigmoid(z)
        return xi * (s * (1 - s)).sqrt()
    p = torch.softmax(z, -1)
    w = xi * p.sqrt()
    if fim_type == "hutchinson_dg":
        return w
    return w - p * w.sum(-1, keepdim=True)


def _split(names, shapes, flat: torch.Tensor) -> dict:
    out, i = {}, 0
    for n, s in zip(names, shapes):
        m = int(torch.Size(s).numel())
        out[n] = flat[i:i + m].reshape(s)
        i += m
    return out


def step_oracle(model, batch, fim_type: str, seed: int, offset: int, logits_fn=None,
                ignore_index: int = -100, **opts: Any) -> dict:
    """The diagonal of one step of a HUTCHINSON type on ``batch``, ``{name: float64}``; ``opts``
    are those of :func:`factor` (``num_probes``, ``likelihood``, ``sigma2``, ``top_k``,
    ``solver``, ``iters``)."""
    names, shapes, J, z = jacobian_rows(model, batch, logits_fn, ignore_index)
    u = factor(z, fim_type, seed, offset, **opts)
    return _split(names, shapes, (torch.einsum("rcp,src->sp", J, u) ** 2).mean(0))


_FACTOR_KEYS = {"num_probes": "num_probes", "likelihood": "likelihood", "sigma2": "sigma2",
                "top_k": "top_k", "rankk_solver": "solver", "lr_power_itrs": "iters"}


def run(model, batches: list, fim_type: str, before: Callable | None = None,
        logits_fn: Callable | None = None, **kw: Any):
    """``(estimator, oracle)`` after stepping ``batches``; ``before(i, model)`` runs before step
    ``i``. The oracle follows ``reduction`` (sum; mean over every valid row) and ``ema`` (docs/
    math.md §9) as the estimator must."""
    est = fimfast.DiagFisher(model, fim_type, seed=kw.pop("seed", 7), **kw)
    opts = {v: kw[k] for k, v in _FACTOR_KEYS.items() if k in kw}
    ema, mean = kw.get("ema"), kw.get("reduction", "sum") == "mean"
    steps, counts = [], []
    for b, offset in stepped(est, model, batches, before):
        names, shapes, J, z = jacobian_rows(model, b, logits_fn, kw.get("ignore_index", -100))
        u = factor(z, fim_type, est.seed, offset, **opts)
        steps.append(_split(names, shapes, (torch.einsum("rcp,src->sp", J, u) ** 2).mean(0)))
        counts.append(z.shape[0])
    ref = {}
    for n in steps[-1]:
        if ema is None:
            ref[n] = sum(st[n] for st in steps) / (sum(counts) if mean else 1)
        else:
            m = 0
            for st, c in zip(steps, counts):
                m = ema * m + (1 - ema) * (st[n] / c if mean else st[n])
            ref[n] = m / (1 - ema ** len(steps))
    return est, ref


# -------------------------------------------------------------------- expectations, variance
def expectation(J: torch.Tensor, z: torch.Tensor, kind: str, top_k: int = 2,
                likelihood: str = "categorical", sigma2: float = 1.0) -> torch.Tensor:
    """``diag sum_r J_r^T M_r J_r`` (P,) for ``kind`` ``exact`` (the core FIM), ``dg``
    (``diag(p)``) or ``rankk`` (``I_k``, from ``torch.linalg.eigh``)."""
    if kind == "exact":
        M = core(z, likelihood, sigma2)
    elif kind == "dg":
        M = torch.diag_embed(torch.softmax(z, -1))
    else:
        lam, vec = top_k_pairs(z, top_k, likelihood, sigma2)
        M = torch.einsum("rk,rkc,rkd->rcd", lam, vec, vec)
    return torch.einsum("rcp,rcd,rdp->p", J, M, J)


def variance(J: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the variance of one probe ``(xi^T b)^2`` with ``b = (A_r J_r e_i)_r``:
    ``2 (|b|^4 - sum b^4)`` (docs/math.md §8); ``A`` (R, m, C) the factors ``u = A^T xi``."""
    b = torch.einsum("rmc,rcp->rmp", A, J).reshape(-1, J.shape[-1])
    return 2 * ((b * b).sum(0) ** 2 - (b ** 4).sum(0))


def factor_matrix(z: torch.Tensor, fim_type: str, top_k: int = 2) -> torch.Tensor:
    """``A`` (R, m, C) with ``u = A^T xi`` for the categorical types."""
    p = torch.softmax(z, -1)
    if fim_type == "hutchinson_dg":
        return torch.diag_embed(p.sqrt())
    if fim_type in ("hutchinson", "hutchinson_sqrt"):
        return torch.diag_embed(p.sqrt()) - p.sqrt().unsqueeze(-1) * p.unsqueeze(-2)
    k = 1 if fim_type == "hutchinson_rank1" else top_k
    lam, vec = top_k_pairs(z, k)
    return lam.clamp_min(0).sqrt().unsqueeze(-1) * vec


def max_rel(est, ref: dict) -> float:
    """The largest relative error over the parameter tensors of ``ref`` (by name)."""
    got = dict(est.result().items())
    worst = 0.0
    for n, r in ref.items():
        if n not in got:
            return float("inf")
        worst = max(worst, float((got[n].double() - r).norm()) / (float(r.norm()) or 1.0))
    return worst
