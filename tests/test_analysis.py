"""fimfast.analysis: core spectrum, the RANKK <= EXACT <= DG sandwich, closed-form variances.

Closed forms are checked three ways: against the float64 oracle (tests/oracle.py), against the
empirical variance of many draws of the library's own estimators (the probe and label streams of
fimfast.likelihoods, the very columns DiagFisher back-propagates), and against torch.linalg.eigh
for the spectrum.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import make_case
from oracle import hutchinson_variance, mc_variance, oracle_flat, row_jacobians
from tolerances import DET_REL_F64, EIGH_F64, STAT_SIGMAS, VAR_REL
from torch.func import functional_call, jacfwd, jacrev

import fimfast
from fimfast import likelihoods
from fimfast.analysis import bounds, core_spectrum, draws_needed, estimator_variances
from fimfast.types import FIMType, Options


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _flat(F, names) -> torch.Tensor:
    return torch.cat([F[n].reshape(-1) for n in names])


# --------------------------------------------------------------------------------------------- #
# spectrum
# --------------------------------------------------------------------------------------------- #
def _logits(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    if kind == "random":
        return torch.randn(16, 7, generator=g, dtype=f64) * 2
    if kind == "peaked":
        return torch.randn(16, 7, generator=g, dtype=f64) * 30
    if kind == "uniform":
        return torch.zeros(3, 6, dtype=f64)
    if kind == "tied":
        rows = [[1.0, 1, 1, 0, 0, 2], [3, 3, 0, 0, -1, -1], [2, 2, 2, 2, 0, 0]]
        return torch.tensor(rows, dtype=f64)
    if kind == "underflow":  # probabilities that are exactly 0 in float64
        return torch.tensor([[0.0, 800, 0, -800, 5, -900]], dtype=f64)
    if kind == "two_classes":
        return torch.randn(8, 2, generator=g, dtype=f64)
    if kind == "tokens":  # (N, T, C)
        return torch.randn(2, 3, 5, generator=g, dtype=f64)
    raise KeyError(kind)


SPEC_KINDS = ["random", "peaked", "uniform", "tied", "underflow", "two_classes", "tokens"]


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_core_spectrum_matches_eigh(kind):
    z = _logits(kind)
    s = core_spectrum(z)
    C = z.shape[-1]
    p = torch.softmax(z, -1)
    I = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ref = torch.linalg.eigvalsh(I).flip(-1)
    assert s.eigenvalues.shape == z.shape and s.eigenvectors.shape == (*z.shape, C)
    assert float((s.eigenvalues - ref).abs().max()) <= EIGH_F64
    V = s.eigenvectors
    eye = torch.eye(C, dtype=z.dtype)
    assert float((V @ V.transpose(-1, -2) - eye).abs().max()) <= 1e-12  # orthonormal basis
    assert float((s.matrix() - I).abs().max()) <= EIGH_F64  # V^T diag(lam) V == I
    resid = torch.einsum("...cd,...jd->...jc", I, V) - s.eigenvalues.unsqueeze(-1) * V
    assert float(resid.abs().max()) <= EIGH_F64
    assert float(s.eigenvalues[..., -1].abs().max()) == 0.0  # the null eigenvalue
    assert bool(s.check_bounds().all())


@pytest.mark.parametrize("kind", ["random", "peaked", "tied"])
def test_core_spectrum_bounds_values(kind):
    z = _logits(kind)
    s = core_spectrum(z)
    p = torch.softmax(z, -1)
    b = s.bounds()
    top = torch.sort(p, -1, descending=True).values
    assert torch.equal(b["interlace_upper"], top[..., 0])
    assert torch.equal(b["interlace_lower"], top[..., 1])
    # 1 - p of the top class as the sum of the others: exact where 1 - p_max cancels
    onem = torch.stack(
        [
            torch.cat([p[r, :c], p[r, c + 1 :]]).sum()
            for r in range(p.shape[0])
            for c in range(p.shape[1])
        ]
    ).reshape(p.shape)
    onem = torch.where(p == p.max(-1, keepdim=True).values, onem, 1 - p)
    assert torch.allclose(b["max_diag"], (p * onem).max(-1).values, rtol=1e-12, atol=0)
    assert torch.allclose(b["trace"], (p * onem).sum(-1), rtol=1e-12, atol=0)
    lam = s.lambda_max
    tol = 1e-14
    for lo, hi in (("interlace_lower", "interlace_upper"), ("max_diag", "trace")):
        assert bool((b[lo] <= lam * (1 + tol)).all()), lo
        assert bool((lam <= b[hi] * (1 + tol)).all()), hi


def test_check_bounds_detects_a_wrong_eigenvalue():
    s = core_spectrum(_logits("random"))
    s.eigenvalues[0, 0] = s.bounds()["trace"][0] * 1.01
    ok = s.check_bounds()
    assert not bool(ok[0]) and bool(ok[1:].all())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_core_spectrum_diagonal_likelihoods(likelihood):
    z = _logits("random")
    s = core_spectrum(z, likelihood, sigma2=0.5)
    d = (
        torch.sigmoid(z) * (1 - torch.sigmoid(z))
        if likelihood == "bernoulli"
        else (torch.full_like(z, 2.0))
    )
    assert torch.allclose(s.matrix(), torch.diag_embed(d), rtol=0, atol=EIGH_F64)
    assert torch.allclose(s.eigenvalues, torch.linalg.eigvalsh(torch.diag_embed(d)).flip(-1))
    assert bool(s.check_bounds().all())


def test_core_spectrum_float32_and_errors():
    s = core_spectrum(_logits("random").float())
    assert s.eigenvalues.dtype == torch.float32 and bool(s.check_bounds().all())
    with pytest.raises(ValueError, match="likelihood"):
        core_spectrum(_logits("random"), "poisson")
    with pytest.raises(ValueError, match="C >= 2"):
        core_spectrum(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="non-finite"):
        core_spectrum(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(TypeError, match="floating"):
        core_spectrum(torch.zeros(3, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------- #
# bounds
# --------------------------------------------------------------------------------------------- #
BOUND_CASES = ["sigmoid_mlp", "cnn", "token_lm", "tied", "multilabel", "regression"]


@pytest.mark.parametrize("name", BOUND_CASES)
def test_bounds_match_oracle_and_order(name):
    case = make_case(name).to(torch.float64)
    b = bounds(case.model, case.batch, likelihood=case.likelihood, top_k=2)
    rj = row_jacobians(case)
    assert _rel(_flat(b.exact, rj.names), oracle_flat(rj, case.likelihood, "exact")) <= DET_REL_F64
    assert _rel(_flat(b.upper, rj.names), oracle_flat(rj, case.likelihood, "dg")) <= DET_REL_F64
    # the lower bound is the expectation of HUTCHINSON_RANKK (top-k entries for diagonal I)
    e_rankk, _ = hutchinson_variance(rj, case.likelihood, "rankk", k=2)
    assert _rel(_flat(b.lower, rj.names), e_rankk) <= DET_REL_F64
    assert b.holds()


def test_bounds_full_rank_equals_exact_and_holds_detects_violation():
    case = make_case("sigmoid_mlp").to(torch.float64)
    b = bounds(case.model, case.batch, top_k=4)  # C = 5: k = C - 1 is the whole core FIM
    names = list(b.exact)
    assert _rel(_flat(b.lower, names), _flat(b.exact, names)) <= DET_REL_F64
    b.lower = b.exact * 1.01
    assert not b.holds()


def test_bounds_mean_reduction_and_errors():
    case = make_case("relu_mlp").to(torch.float64)
    s = bounds(case.model, case.batch)
    m = bounds(case.model, case.batch, reduction="mean")
    assert (m.exact * 5).allclose(s.exact, rtol=1e-12)
    with pytest.raises(ValueError, match="top_k must be <= 4"):
        bounds(case.model, case.batch, top_k=5)
    with pytest.raises(ValueError, match="reduction"):
        bounds(case.model, case.batch, reduction="max")


# --------------------------------------------------------------------------------------------- #
# closed-form variances vs the oracle
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["sigmoid_mlp", "token_lm", "multilabel", "regression"])
def test_variances_match_oracle(name):
    case = make_case(name).to(torch.float64)
    ev = estimator_variances(
        case.model, case.batch, likelihood=case.likelihood,
        types=["monte_carlo", "hutchinson", "hutchinson_dg", "hutchinson_rankk"], top_k=2,
    )  # fmt: skip
    rj = row_jacobians(case)
    for kind, key in (
        ("hutchinson", "hutchinson"),
        ("dg", "hutchinson_dg"),
        ("rankk", "hutchinson_rankk"),
    ):
        e, v = hutchinson_variance(rj, case.likelihood, kind, k=2)
        assert _rel(_flat(ev.mean[key], rj.names), e) <= DET_REL_F64, key
        assert _rel(_flat(ev[key], rj.names), v) <= DET_REL_F64, key
    exact = oracle_flat(rj, case.likelihood, "exact")
    assert _rel(_flat(ev.fisher, rj.names), exact) <= DET_REL_F64
    assert _rel(_flat(ev.mean["monte_carlo"], rj.names), exact) <= DET_REL_F64
    if case.likelihood == "categorical":
        _, v = mc_variance(rj)
        assert _rel(_flat(ev["monte_carlo"], rj.names), v) <= DET_REL_F64


# --------------------------------------------------------------------------------------------- #
# closed-form variances vs the empirical variance of the library's draws
# --------------------------------------------------------------------------------------------- #
NDRAWS = 1 << 15  # measured max relative variance error: <= 0.041
_CASE_OF = {"categorical": "sigmoid_mlp", "bernoulli": "multilabel", "gaussian": "regression"}


class _Logits(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.m = case.model
        self.case = case

    def forward(self):
        z = self.case.logits_fn(self.m, self.case.batch_double())
        return z.reshape(-1, z.shape[-1])[self.case.valid.reshape(-1)]


def _derivs(case):
    """Brute force, float64: J (R, C, P) and the second derivatives W (R, C, P) of the logits,
    the latter from full Hessians (forward-over-reverse, independent of the library's path)."""
    rj = row_jacobians(case)
    mod = _Logits(case)
    theta = torch.cat([p.detach().reshape(-1) for _, p in case.model.named_parameters()])

    def f(t):
        return functional_call(mod, {"m." + n: s for n, s in rj.split(t).items()}, ())

    H = jacfwd(jacrev(f))(theta)  # (R, C, P, P)
    W = H.diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(jacrev(f)(theta), rj.J, atol=1e-12)
    return rj, W


@pytest.fixture(scope="module")
def brute():
    out = {}
    for lk, name in _CASE_OF.items():
        case = make_case(name).to(torch.float64)
        out[lk] = (case, *_derivs(case))
    return out


def _score_draws(z, likelihood, n, seed):
    """``(n, R, C)`` sampled scores d log p(yhat)/dz: the MONTE_CARLO columns, one per draw."""
    opts = Options(num_probes=n, likelihood=likelihood, backend="torch")
    return likelihoods.score_columns(z, None, FIMType.MONTE_CARLO, opts, seed, 0) * math.sqrt(n)


def _probe_draws(z, likelihood, fim_type, n, seed):
    opts = Options(num_probes=n, likelihood=likelihood, top_k=2, backend="torch")
    return likelihoods.probe_factor(z, FIMType(fim_type), opts, seed, 0)


def _library_single_draw(case, fim_type, seed):
    est = fimfast.DiagFisher(
        case.model,
        fim_type,
        likelihood=case.likelihood,
        seed=seed,
        num_probes=1,
        top_k=2,
        backend="torch",
    )
    est.step(case.batch)
    return est.result().to_vector()


VAR_TYPES = [
    ("categorical", "monte_carlo"), ("categorical", "hessian"), ("categorical", "hutchinson"),
    ("categorical", "hutchinson_dg"), ("categorical", "hutchinson_rankk"),
    ("bernoulli", "monte_carlo"), ("bernoulli", "hessian"), ("bernoulli", "hutchinson"),
    ("bernoulli", "hutchinson_rankk"),
    ("gaussian", "monte_carlo"), ("gaussian", "hessian"), ("gaussian", "hutchinson_rankk"),
]  # fmt: skip


@pytest.mark.parametrize("likelihood,kind", VAR_TYPES, ids=[f"{a}-{b}" for a, b in VAR_TYPES])
def test_variance_closed_form_vs_draws(brute, likelihood, kind):
    case, rj, W = brute[likelihood]
    z = rj.z
    seed = 4242
    ev = estimator_variances(case.model, case.batch, likelihood=likelihood, types=[kind], top_k=2)
    var, mean = _flat(ev[kind], rj.names), _flat(ev.mean[kind], rj.names)
    if kind in ("monte_carlo", "hessian"):
        g = _score_draws(z, likelihood, NDRAWS, seed)  # (S, R, C)
        if kind == "monte_carlo":
            d = (torch.einsum("src,rcp->srp", g, rj.J) ** 2).sum(1)
        else:
            # -d2 log p(yhat)/dtheta_i^2 = v^T I v - g^T w for every likelihood here
            I = _core(z, likelihood)
            vIv = torch.einsum("rcp,rcd,rdp->p", rj.J, I, rj.J)
            d = vIv - torch.einsum("src,rcp->sp", g, W)
        first = _score_draws(z, likelihood, 1, seed)
    else:
        u = _probe_draws(z, likelihood, kind, NDRAWS, seed)  # (S, R, C)
        d = torch.einsum("src,rcp->sp", u, rj.J) ** 2
        first = _probe_draws(z, likelihood, kind, 1, seed)
    if kind != "hessian":  # the draws are the library estimator's: draw 0 equals one step
        one = (torch.einsum("src,rcp->srp", first, rj.J) ** 2).sum(1)[0]
        if kind != "monte_carlo":
            one = torch.einsum("src,rcp->sp", first, rj.J)[0] ** 2
        lib = _library_single_draw(case, "monte_carlo" if kind == "monte_carlo" else kind, seed)
        assert torch.allclose(lib, one, rtol=1e-10, atol=1e-14 * float(one.abs().max()))
    emp_mean, emp_var = d.mean(0), d.var(0)
    big = var > 1e-3 * var.max()  # coordinates with a non-negligible variance
    assert int(big.sum()) >= 10
    rel = ((emp_var - var).abs() / var)[big]
    assert float(rel.max()) <= VAR_REL, f"max relative variance error {float(rel.max()):.3f}"
    se = (var / NDRAWS).sqrt()
    z_mean = ((emp_mean - mean).abs() / se)[big]
    assert float(z_mean.max()) <= STAT_SIGMAS
    # coordinates of zero variance are constant across draws
    zero = var <= 1e-12 * var.max()
    assert bool((emp_var[zero] <= 1e-10 * var.max()).all())


def _core(z, likelihood):
    if likelihood == "categorical":
        p = torch.softmax(z, -1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    if likelihood == "bernoulli":
        s = torch.sigmoid(z)
        return torch.diag_embed(s * (1 - s))
    return torch.eye(z.shape[-1], dtype=z.dtype).expand(z.shape[0], -1, -1)


def test_hessian_draw_identity(brute):
    """-d2 log p(y)/dtheta_i^2 (autograd, double backward) == v^T I v - (e_y - p)^T w."""
    case, rj, W = brute["categorical"]
    model = case.model
    x = case.batch_double()[0]
    params = list(model.parameters())
    p = torch.softmax(rj.z, -1)
    I = _core(rj.z, "categorical")
    vIv = torch.einsum("rcp,rcd,rdp->rp", rj.J, I, rj.J)
    for r, y in ((0, 1), (3, 4)):
        logp = torch.log_softmax(model(x[r : r + 1]), -1)[0, y]
        g = torch.autograd.grad(logp, params, create_graph=True)
        gflat = torch.cat([t.reshape(-1) for t in g])
        diag = torch.stack([
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(gflat[i], params,
                                                                    retain_graph=True)])[i]
            for i in range(0, gflat.numel(), 7)
        ])  # fmt: skip
        score = torch.nn.functional.one_hot(torch.tensor(y), 5).double() - p[r]
        formula = vIv[r] - torch.einsum("c,cp->p", score, W[r])
        assert torch.allclose(-diag, formula[::7], rtol=1e-9, atol=1e-13)


def test_draws_needed_chebyshev_holds(brute):
    """Means of S = draws_needed(...) probes miss by more than eps at most delta of the time."""
    case, rj, _ = brute["categorical"]
    ev = estimator_variances(case.model, case.batch, types=["hutchinson"])
    eps, delta = 0.5, 0.2
    S = draws_needed(ev["hutchinson"], ev.mean["hutchinson"], eps, delta)
    i = int(torch.argmax(_flat(S, rj.names)))  # the hardest coordinate
    s_i = int(_flat(S, rj.names)[i])
    u = _probe_draws(rj.z, "categorical", "hutchinson", 4000 * s_i, 99)
    d = (torch.einsum("src,rc->sr", u, rj.J[:, :, i]).sum(1) ** 2).reshape(4000, s_i).mean(1)
    F = float(_flat(ev.mean["hutchinson"], rj.names)[i])
    miss = float(((d - F).abs() > eps * F).double().mean())
    assert miss <= delta


def test_draws_needed_formula_and_errors():
    assert draws_needed(8.0, 2.0, 0.5, 0.5) == 16.0  # 8 / (0.5 * 0.5^2 * 2^2)
    assert draws_needed(0.0, 2.0, 0.1, 0.1) == 1.0
    t = draws_needed(torch.tensor([8.0, 8.01]), torch.tensor([2.0, 2.0]), 0.5, 0.5)
    assert t.tolist() == [16.0, 17.0]
    F = fimfast.DiagFIM({"w": torch.tensor([1.0, 2.0])})
    V = fimfast.DiagFIM({"w": torch.tensor([2.0, 2.0])})
    assert draws_needed(V, F, 1.0, 0.5)["w"].tolist() == [4.0, 1.0]
    for bad in ({"eps": 0}, {"delta": 1.0}, {"delta": 0}):
        kw = {"eps": 0.1, "delta": 0.1, **bad}
        with pytest.raises(ValueError):
            draws_needed(1.0, 1.0, **kw)


# --------------------------------------------------------------------------------------------- #
# API of estimator_variances
# --------------------------------------------------------------------------------------------- #
def test_variances_params_subset_reduction_and_guard():
    case = make_case("sigmoid_mlp").to(torch.float64)
    full = estimator_variances(case.model, case.batch, types=["I1", "I2"])
    assert set(full) == {"monte_carlo", "hessian"}
    sub = estimator_variances(case.model, case.batch, types=["hessian"], params=["2.weight"])
    assert list(sub["hessian"]) == ["2.weight"]
    assert torch.allclose(sub["hessian"]["2.weight"], full["hessian"]["2.weight"], rtol=1e-12)
    mean = estimator_variances(case.model, case.batch, types=["hessian"], reduction="mean")
    assert torch.allclose(mean["hessian"].to_vector() * 25, full["hessian"].to_vector(), rtol=1e-12)
    assert torch.allclose(mean.fisher.to_vector() * 5, full.fisher.to_vector(), rtol=1e-12)
    # the last layer enters the logits linearly: Î2 is exact there (zero variance)
    assert float(full["hessian"]["4.weight"].abs().max()) == 0.0
    assert float(full["hessian"]["0.weight"].abs().max()) > 0.0
    with pytest.raises(ValueError, match="small models"):
        estimator_variances(case.model, case.batch, max_params=100)
    with pytest.raises(ValueError, match="unknown parameter"):
        estimator_variances(case.model, case.batch, params=["nope"])


def test_variances_with_interacting_rows_leave_buffers_alone():
    """BatchNorm in training mode: rows interact through the batch statistics (the oracle's
    per-row Jacobians include that), and the model's running statistics stay as they were."""
    case = make_case("relu_mlp").to(torch.float64)
    torch.manual_seed(3)
    case.model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 5)
    ).double()
    before = case.model[1].running_mean.clone()
    ev = estimator_variances(case.model, case.batch, types=["hutchinson"])
    assert torch.equal(case.model[1].running_mean, before)
    rj = row_jacobians(case)
    e, v = hutchinson_variance(rj, "categorical", "hutchinson")
    assert _rel(_flat(ev.mean["hutchinson"], rj.names), e) <= DET_REL_F64
    assert _rel(_flat(ev["hutchinson"], rj.names), v) <= DET_REL_F64


def test_variances_fall_back_to_a_loop_where_vmap_fails(monkeypatch):
    import fimfast.analysis.derivatives as deriv

    case = make_case("sigmoid_mlp").to(torch.float64)
    ref = estimator_variances(case.model, case.batch, types=["hessian", "hutchinson"])

    def no_vmap(fn):
        def fail(*args):
            raise RuntimeError("vmap: no batching rule")

        return fail

    monkeypatch.setattr(deriv, "vmap", no_vmap)
    loop = estimator_variances(case.model, case.batch, types=["hessian", "hutchinson"])
    for k in ("hessian", "hutchinson"):
        assert loop[k].allclose(ref[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad,match", [
    ({"types": ["empirical"]}, "deterministic"),
    ({"types": ["sophia"]}, "types must be among"),
    ({"likelihood": "poisson"}, "likelihood"),
    ({"top_k": 5}, "top_k must be <= 4"),
    ({"reduction": "max"}, "reduction"),
], ids=["empirical", "unknown", "likelihood", "top_k", "reduction"])  # fmt: skip
def test_variances_errors(bad, match):
    case = make_case("relu_mlp")
    with pytest.raises(ValueError, match=match):
        estimator_variances(case.model, case.batch, **bad)
