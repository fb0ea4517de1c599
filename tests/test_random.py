"""Random estimators, statistically: unbiasedness, the variance law, the order of the bounds.

Every test uses fixed seeds. Means are compared to their targets within STAT_SIGMAS standard
errors per coordinate (a max over P coordinates: with P ~ 30 and 4 sigmas the false-alarm rate is
below 0.2% per test, and the seeds are fixed); variances within VAR_REL relative.
"""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from oracle import hutchinson_variance, mc_variance, oracle_flat, row_jacobians
from tolerances import SQRT_VS_HUTCH_REL, STAT_SIGMAS, VAR_REL

import fimfast

NDRAWS = 2048


def tiny_case(likelihood: str = "categorical", C: int = 4):
    """A 3-4-C tanh MLP on 3 samples, float64 (about 30 parameters)."""
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, C))
    case = make_case("relu_mlp")  # reuse the container; swap in this model and batch
    case.model = model.double()
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    case.batch = (x,)
    case.valid = torch.ones(3, dtype=torch.bool)
    case.labels = None
    case.likelihood = likelihood
    case.C = C
    return case


def draws(case, fim_type: str, n: int = NDRAWS, **opts) -> torch.Tensor:
    """``n`` independent single-draw estimates as an ``(n, P)`` float64 matrix."""
    est = fimfast.DiagFisher(case.model, fim_type, likelihood=case.likelihood, seed=2024, **opts)
    out = []
    for _ in range(n):
        est.reset()
        est.step(case.batch)
        out.append(est.result().to_vector())
    return torch.stack(out).double()


def assert_unbiased(samples: torch.Tensor, target: torch.Tensor):
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    z = (mean - target).abs() / se.clamp_min(1e-300)
    ok = (z <= STAT_SIGMAS) | ((mean - target).abs() <= 1e-12 * target.abs().max())
    assert bool(ok.all()), f"max |z| = {float(z[~ok].max()):.2f} over {int((~ok).sum())} coords"


CASES = [
    ("hutchinson", "categorical", "exact"),
    ("hutchinson_sqrt", "categorical", "exact"),
    ("monte_carlo", "categorical", "exact"),
    ("hutchinson_dg", "categorical", "dg"),
    ("hutchinson_rankk", "categorical", "rankk"),
    ("hutchinson_rank1", "categorical", "rank1"),
    ("hutchinson", "bernoulli", "exact"),
    ("monte_carlo", "bernoulli", "exact"),
    ("hutchinson_rankk", "bernoulli", "rankk"),
    ("hutchinson", "gaussian", "exact"),
    ("monte_carlo", "gaussian", "exact"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fim_type,likelihood,target", CASES,
                         ids=[f"{t}-{lk}" for t, lk, _ in CASES])
def test_mean_converges_to_target(fim_type, likelihood, target):
    case = tiny_case(likelihood)
    rj = row_jacobians(case)
    quantity, k = {"rank1": ("rankk", 1), "rankk": ("rankk", 2)}.get(target, (target, 2))
    ref = oracle_flat(rj, likelihood, quantity, k=k)
    assert_unbiased(draws(case, fim_type, top_k=2), ref)


VAR_CASES = [
    ("hutchinson", "hutchinson", 2),
    ("hutchinson_dg", "dg", 2),
    ("hutchinson_rankk", "rankk", 2),
    ("hutchinson_rank1", "rankk", 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("fim_type,kind,k", VAR_CASES, ids=[v[0] for v in VAR_CASES])
def test_hutchinson_variance_law(fim_type, kind, k):
    """Var(D_i) = 2(|b|^4 - sum b^4) per coordinate (docs/math.md §8), within VAR_REL."""
    case = tiny_case()
    rj = row_jacobians(case)
    _, var = hutchinson_variance(rj, "categorical", kind, k=k)
    s = draws(case, fim_type, n=4096, top_k=2)
    emp = s.var(0)
    big = var > 1e-3 * var.max()  # coordinates with a non-negligible variance
    rel = (emp[big] - var[big]).abs() / var[big]
    assert float(rel.max()) <= VAR_REL, f"max relative variance error {float(rel.max()):.3f}"


@pytest.mark.slow
def test_monte_carlo_variance_law():
    """Var(I1) = sum_c p_c (v_c - vbar)^4 - (sum_c p_c (v_c - vbar)^2)^2 (docs/math.md §8)."""
    case = tiny_case()
    rj = row_jacobians(case)
    _, var = mc_variance(rj)
    emp = draws(case, "monte_carlo", n=4096).var(0)
    big = var > 1e-3 * var.max()
    rel = (emp[big] - var[big]).abs() / var[big]
    assert float(rel.max()) <= VAR_REL, f"max relative variance error {float(rel.max()):.3f}"


def test_bounds_order_in_expectation():
    """DG >= EXACT >= RANK2 >= RANK1 elementwise (closed forms), and RANK(C-1) == EXACT."""
    case = tiny_case(C=4)
    rj = row_jacobians(case)
    dg = oracle_flat(rj, "categorical", "dg")
    ex = oracle_flat(rj, "categorical", "exact")
    r2 = oracle_flat(rj, "categorical", "rankk", k=2)
    r1 = oracle_flat(rj, "categorical", "rankk", k=1)
    r3 = oracle_flat(rj, "categorical", "rankk", k=3)
    eps = 1e-12 * float(dg.abs().max())
    assert bool((dg >= ex - eps).all())
    assert bool((ex >= r2 - eps).all())
    assert bool((r2 >= r1 - eps).all())
    assert torch.allclose(r3, ex, rtol=1e-10, atol=eps)
    # E[DG] - EXACT = sum_n (p_n^T v_n)^2 (docs/math.md §6)
    p = torch.softmax(rj.z, -1)
    gap = (torch.einsum("rc,rcp->rp", p, rj.J) ** 2).sum(0)
    assert torch.allclose(dg - ex, gap, rtol=1e-9, atol=eps)


@pytest.mark.slow
def test_rank_c_minus_1_matches_exact_in_expectation():
    case = tiny_case(C=4)
    rj = row_jacobians(case)
    ex = oracle_flat(rj, "categorical", "exact")
    assert_unbiased(draws(case, "hutchinson_rankk", n=1024, top_k=3), ex)


@pytest.mark.parametrize("name", ["relu_mlp", "encoder", "token_lm"])
@pytest.mark.parametrize("num_probes", [1, 3])
def test_sqrt_equals_hutchinson_for_same_probes(name, num_probes):
    case = make_case(name)
    out = {}
    for t in ("hutchinson", "hutchinson_sqrt"):
        est = fimfast.DiagFisher(case.model, t, seed=77, num_probes=num_probes)
        est.step(case.batch)
        out[t] = est.result().to_vector().double()
    a, b = out["hutchinson"], out["hutchinson_sqrt"]
    assert float((a - b).norm() / a.norm()) <= SQRT_VS_HUTCH_REL


def test_power_solver_close_to_exact_solver():
    """rankk_solver='power' (the paper's) approaches the secular solver as iterations grow."""
    case = make_case("relu_mlp").to(torch.float64)
    res = {}
    for solver, itrs in (("exact", 1), ("power", 200)):
        est = fimfast.DiagFisher(case.model, "hutchinson_rankk", seed=5, rankk_solver=solver,
                                 lr_power_itrs=itrs)
        est.step(case.batch)
        res[solver] = est.result().to_vector()
    rel = (res["power"] - res["exact"]).norm() / res["exact"].norm()
    assert float(rel) < 1e-6


def test_num_probes_averages():
    """S probes in one step equal the mean of the S single-probe estimates on the same stream."""
    case = make_case("relu_mlp").to(torch.float64)
    est = fimfast.DiagFisher(case.model, "hutchinson", seed=9, num_probes=4)
    est.step(case.batch)
    four = est.result().to_vector()
    from fimfast import likelihoods  # the same stream, probe by probe
    from fimfast.batch import rows as make_rows

    names, params = fimfast.estimator.trainable_parameters(case.model)
    z = case.model(case.batch[0])
    r = make_rows(z, None, None, "categorical", -100, False)
    u = likelihoods.probe_factor(r.flat, fimfast.FIMType.HUTCHINSON, est.opts, 9, 0)
    acc = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for s in range(4):
        g = torch.autograd.grad(r.flat, params, u[s], retain_graph=True)
        acc += torch.cat([x.reshape(-1) for x in g]) ** 2 / 4
    assert torch.allclose(four, acc, rtol=1e-12)
