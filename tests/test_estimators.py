"""Deterministic estimators against the float64 oracle, on the whole model panel."""

from __future__ import annotations

import pytest
import torch
from cases import PANEL, make_case
from oracle import oracle
from tolerances import DET_REL_F32, DET_REL_F64

import fimfast

DTYPES = {"f32": (torch.float32, DET_REL_F32), "f64": (torch.float64, DET_REL_F64)}


def rel_err(d, ref) -> float:
    a = torch.cat([d[k].double().reshape(-1) for k in ref])
    b = torch.cat([ref[k].double().reshape(-1) for k in ref])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
@pytest.mark.parametrize("name", PANEL)
def test_deterministic_vs_oracle(name, fim_type, dtype):
    case = make_case(name)
    dt, tol = DTYPES[dtype]
    c = case.to(dt)
    est = fimfast.DiagFisher(c.model, fim_type, likelihood=c.likelihood)
    est.step(c.batch)
    got = est.result()
    ref = oracle(case, fim_type)
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == dt  # float32 state for float32 models, float64 for float64
        assert got[k].shape == ref[k].shape
    assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("name", ["relu_mlp", "cnn", "encoder", "tied", "multilabel"])
def test_empirical_matches_vmap_grad_squares(name):
    """EMPIRICAL equals the squares of torch.func per-sample gradients of the log-likelihood."""
    from torch.func import functional_call, grad, vmap

    case = make_case(name).to(torch.float64)
    model = case.model
    x, y = case.batch
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(pr, xi, yi):
        z = functional_call(model, pr, (xi.unsqueeze(0),))
        if case.likelihood == "categorical":
            return torch.nn.functional.cross_entropy(z, yi.unsqueeze(0), reduction="sum")
        return torch.nn.functional.binary_cross_entropy_with_logits(
            z, yi.unsqueeze(0), reduction="sum")

    g = vmap(grad(nll), in_dims=(None, 0, 0))(params, x, y)
    ref = {k: (v ** 2).sum(0) for k, v in g.items()}
    est = fimfast.DiagFisher(model, "empirical", likelihood=case.likelihood)
    est.step(case.batch)
    assert rel_err(est.result(), ref) <= DET_REL_F64


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_last_linear_closed_form(dtype):
    """docs/math.md §3: diag F of the logits layer is sum_n p(1-p) (x) a^2 and sum_n p(1-p)."""
    dt, tol = DTYPES[dtype]
    torch.manual_seed(3)
    body = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh()).to(dt)
    head = torch.nn.Linear(6, 7).to(dt)
    model = torch.nn.Sequential(body, head)
    x = torch.randn(9, 5, dtype=dt)
    est = fimfast.DiagFisher(model, "exact")
    est.step((x,))
    F = est.result()
    with torch.no_grad():
        a = body(x).double()
        p = torch.softmax(head(body(x)).double(), -1)
    w_ref = (p * (1 - p)).T @ (a * a)
    b_ref = (p * (1 - p)).sum(0)
    assert rel_err({"w": F["1.weight"]}, {"w": w_ref}) <= tol
    assert rel_err({"b": F["1.bias"]}, {"b": b_ref}) <= tol


@pytest.mark.parametrize("class_chunk", [1, 2, 5], ids=lambda c: f"chunk{c}")
def test_exact_class_chunks_agree(class_chunk):
    case = make_case("relu_mlp").to(torch.float64)
    ref = oracle(case, "exact")
    est = fimfast.DiagFisher(case.model, "exact", class_chunk=class_chunk)
    est.step(case.batch)
    assert rel_err(est.result(), ref) <= DET_REL_F64


def test_frozen_parameters_are_skipped():
    case = make_case("relu_mlp").to(torch.float64)
    case.model[0].weight.requires_grad_(False)
    est = fimfast.DiagFisher(case.model, "exact")
    est.step(case.batch)
    F = est.result()
    assert "0.weight" not in F
    ref = oracle(case, "exact")
    assert set(F) == set(ref)
    assert rel_err(F, ref) <= DET_REL_F64


def test_unused_parameter_gets_zeros():
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(3, 4)
            self.unused = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = WithUnused()
    x = torch.randn(5, 3)
    for t in ("exact", "hutchinson"):
        est = fimfast.DiagFisher(model, t, seed=3)
        est.step(x)
        F = est.result()
        assert torch.count_nonzero(F["unused.weight"]) == 0
        assert torch.count_nonzero(F["unused.bias"]) == 0
        # the used layer's values are those of the same Linear on its own, same seed, same draws
        alone = fimfast.DiagFisher(model.used, t, seed=3)
        alone.step(x)
        G = alone.result()
        assert torch.equal(F["used.weight"], G["weight"]) and torch.equal(F["used.bias"], G["bias"])
        if t == "exact":  # the single-Linear closed form F_W = sum_n (p_n(1-p_n)) x x_n^2
            with torch.no_grad():
                w, b = model.used.weight.double(), model.used.bias.double()
                p = torch.softmax(x.double() @ w.T + b, -1)
            coef = p * (1 - p)
            ref = {"used.weight": coef.T @ x.double() ** 2, "used.bias": coef.sum(0)}
            assert rel_err(F, ref) <= DET_REL_F32
