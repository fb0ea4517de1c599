"""Cosine classifiers: weights normalized per unit, ``F.normalize(W, dim=d)`` or ``W /
W.norm(dim=d, keepdim=True)`` (clamped or not), used by ``F.linear``, ``x @ W``, ``torch.einsum``,
``F.conv2d`` and an ``nn.Linear`` (a parametrization), rows, columns or the whole weight, with a
learnable scale ``logit_scale.exp()``. Their pullback takes the closed form of
fimfast/pullback_closed.py (docs/math.md §4 "Computed weights"): pinned here by making the general
pullback (a backward of ``f``) raise. Every result is checked against the float64 oracle
(tests/oracle.py), with the oracle's Fisher of the normalized parameter not zero; a norm at or
below the clamp's ``eps`` takes the general pullback, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import Case, Fn, check_fast_twice, check_monte_carlo_same_seed, classifier_case
from oracle import oracle, rel_error, row_jacobians
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn
from torch.nn.utils import parametrize

N, C, D = 5, 3, 6


def _p(*shape) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.5)


def _feat(s, x):
    return F.normalize(torch.tanh(s.a(x)), dim=-1)


class UnitRows(nn.Module):
    def forward(self, X):
        return F.normalize(X, dim=1)


def _cos(head, W) -> nn.Module:
    """Features normalized, a learnable scale, ``head(features, W)``."""
    return Fn(lambda s, x: s.t.exp() * head(_feat(s, x), s.W), a=nn.Linear(4, D), W=W,
              t=nn.Parameter(torch.tensor(1.2)))


def _param_head() -> nn.Module:
    torch.manual_seed(0)
    head = nn.Linear(D, C, bias=False)
    parametrize.register_parametrization(head, "weight", UnitRows())
    return nn.Sequential(nn.Linear(4, D), nn.Tanh(), head)


def _hidden_param() -> nn.Module:
    torch.manual_seed(0)
    hid = nn.Linear(4, D)
    parametrize.register_parametrization(hid, "weight", UnitRows())
    return nn.Sequential(hid, nn.Tanh(), nn.Linear(D, C))


def _conv(dims) -> nn.Module:
    def fwd(s, x):
        W = s.W / torch.linalg.vector_norm(s.W, dim=dims, keepdim=True)
        return s.o(torch.tanh(F.conv2d(x, W, padding=1)).flatten(1))
    return Fn(fwd, W=_p(3, 2, 3, 3), o=nn.Linear(3 * 9, C))


# name: (model builder, input shape, the normalized parameter)
MODELS = {
    "linear_rows": (lambda: _cos(lambda h, W: F.linear(h, F.normalize(W, dim=1)), _p(C, D)),
                    (N, 4), "W"),
    "linear_rows_last": (lambda: _cos(lambda h, W: F.linear(h, F.normalize(W, dim=-1)),
                                      _p(C, D)), (N, 4), "W"),
    "linear_cols": (lambda: _cos(lambda h, W: F.linear(h, F.normalize(W, dim=0)), _p(C, D)),
                    (N, 4), "W"),
    "matmul_cols_of_storage": (lambda: _cos(lambda h, W: h @ F.normalize(W, dim=0), _p(D, C)),
                               (N, 4), "W"),
    "matmul_rows_of_storage": (lambda: _cos(lambda h, W: h @ F.normalize(W, dim=1), _p(D, C)),
                               (N, 4), "W"),
    "by_hand": (lambda: _cos(lambda h, W: F.linear(h, W / W.norm(dim=1, keepdim=True)),
                             _p(C, D)), (N, 4), "W"),
    "by_hand_clamp_min": (lambda: _cos(lambda h, W: h @ (W / torch.linalg.vector_norm(
        W, dim=0, keepdim=True).clamp_min(1e-8)), _p(D, C)), (N, 4), "W"),
    "by_hand_clamp": (lambda: _cos(lambda h, W: F.linear(h, W / W.norm(
        dim=1, keepdim=True).clamp(min=1e-8)), _p(C, D)), (N, 4), "W"),
    "whole": (lambda: _cos(lambda h, W: h @ (W / W.norm()), _p(D, C)), (N, 4), "W"),
    "twice": (lambda: _cos(lambda h, W: (lambda Wn: F.linear(h, Wn) + F.linear(
        torch.sin(h), Wn))(F.normalize(W, dim=1)), _p(C, D)), (N, 4), "W"),
    "nn_linear_weight": (lambda: Fn(lambda s, x: 2.0 * F.linear(
        _feat(s, x), F.normalize(s.h.weight, dim=1), s.h.bias), a=nn.Linear(4, D),
        h=nn.Linear(D, C)), (N, 4), "h.weight"),
    "parametrized_head": (_param_head, (N, 4), "2.parametrizations.weight.original"),
    "parametrized_hidden": (_hidden_param, (N, 4), "0.parametrizations.weight.original"),
    "conv_rows": (lambda: _conv((1, 2, 3)), (N, 2, 3, 3), "W"),
    "conv_cols": (lambda: _conv(0), (N, 2, 3, 3), "W"),
    "einsum": (lambda: _cos(lambda h, W: torch.einsum("nd,cd->nc", h, F.normalize(W, dim=-1)),
                            _p(C, D)), (N, 4), "W"),
}
# the contraction's rule gives the per-unit gradients of W directly: the closed form is applied
# to them (pullback_closed.dense) instead of a backward of f
DENSE = {"einsum"}


def _case(name: str, dtype=torch.float64) -> Case:
    build, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    return classifier_case(model, (x, y), C, name)


def _no_backward_of_f(monkeypatch, dense: bool) -> None:
    """The general pullback raises: only the closed forms may run (with ``dense``, the one on
    per-unit gradients; else the one forming none)."""
    from fimfast import pullback

    def boom(*a, **k):
        raise AssertionError("the general pullback ran")

    monkeypatch.setattr(pullback, "_batched", boom)
    monkeypatch.setattr(pullback, "_looped", boom)
    if not dense:
        monkeypatch.setattr(pullback, "_pull", boom)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cosine_head_takes_the_closed_form(name, quantity, monkeypatch):
    case = _case(name)
    ref = oracle(case, quantity)
    assert ref[MODELS[name][2]].abs().sum() > 0  # not a detached use
    _no_backward_of_f(monkeypatch, name in DENSE)
    est = check_fast_twice(case, quantity, ref, DET_REL_F64)
    assert est._persample.last_plan.pullbacks


@pytest.mark.parametrize("name", ["linear_rows", "matmul_cols_of_storage", "linear_cols",
                                  "conv_rows", "einsum"])
def test_cosine_head_monte_carlo_same_seed(name, monkeypatch):
    _no_backward_of_f(monkeypatch, name in DENSE)
    est = check_monte_carlo_same_seed(_case(name), row_jacobians(_case(name)), DET_REL_F64)
    assert not est._persample.last_plan.generic


def test_cosine_head_hutchinson_follows_its_law():
    """HUTCHINSON (one backward per probe, no capture): mean and variance of 4-probe steps
    against the closed forms of the oracle (tests/test_random.py's law)."""
    from oracle import hutchinson_variance
    from test_random import assert_law, step_means

    case = _case("matmul_cols_of_storage")
    mean, var1 = hutchinson_variance(row_jacobians(case), "categorical", "hutchinson")
    assert_law(step_means(case, "hutchinson", steps=48, probes=4, seed=97), mean, var1, 4)


class TokenCosine(nn.Module):
    """Token-level logits ``(N, T, C)`` of a cosine head: the weight shared by the tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.a, self.dim = nn.Linear(4, D), dim
        self.W = _p(D, C) if dim == 0 else _p(C, D)
        self.t = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        h = F.normalize(torch.tanh(self.a(x)), dim=-1)
        if self.dim == 0:
            return self.t.exp() * (h @ F.normalize(self.W, dim=0))
        return self.t.exp() * F.linear(h, F.normalize(self.W, dim=0))


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("dim", [0, 1])
def test_token_level_cosine_head(dim, quantity, monkeypatch):
    torch.manual_seed(0)
    model = TokenCosine(dim).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N, 3), generator=g)
    case = Case(f"tokens{dim}", model, (x, y), lambda m, b: m(b[0]),
                torch.ones(N, 3, dtype=torch.bool), y, "categorical", C)
    ref = oracle(case, quantity)
    assert ref["W"].abs().sum() > 0
    _no_backward_of_f(monkeypatch, False)
    check_fast_twice(case, quantity, ref, DET_REL_F64)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_a_norm_at_the_clamp_takes_the_general_pullback(quantity):
    """A row of ``W`` whose norm is at or below ``eps`` (the clamp's derivative is zero there):
    not the closed form, and exact."""
    from fimfast import pullback_closed

    case = _case("linear_rows")
    with torch.no_grad():
        case.model.W[1] *= 1e-3 / case.model.W[1].norm()
    eps = 1e-3  # the clamp holds the norm of row 1 exactly at eps
    case.model.fwd = lambda s, x: s.t.exp() * F.linear(_feat(s, x), F.normalize(s.W, dim=1,
                                                                                  eps=eps))
    W = F.normalize(case.model.W, dim=1, eps=eps)
    assert pullback_closed.normalized_of(W) is None
    assert pullback_closed.normalized_of(F.normalize(case.model.W, dim=1, eps=1e-4)) is not None
    ref = oracle(case, quantity)
    assert ref["W"].abs().sum() > 0
    est = check_fast_twice(case, quantity, ref, DET_REL_F64)
    assert est._persample.last_plan.pullbacks


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_a_normalized_weight_also_used_elsewhere(quantity):
    """``W`` also used directly (then the generic path, exact), and the normalized weight also
    used by a call without a rule (exact on whichever path)."""
    from cases import run_case

    for fwd, generic in (
            (lambda s, x: F.linear(_feat(s, x), F.normalize(s.W, dim=1)) + x[:, :1] * s.W[:, 0],
             {"W"}),
            (lambda s, x: (lambda Wn: F.linear(_feat(s, x), Wn) + Wn.sum(1) * x[:, :1])(
                F.normalize(s.W, dim=1)), None)):
        torch.manual_seed(0)
        model = Fn(fwd, a=nn.Linear(4, D), W=_p(C, D)).double()
        x = torch.randn(N, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        case = classifier_case(model, (x, torch.tensor([0, 1, 2, 0, 1])), C)
        ref = oracle(case, quantity)
        assert ref["W"].abs().sum() > 0
        got, est = run_case(case, quantity)
        assert rel_error(got, ref) <= DET_REL_F64
        plan = est._persample.last_plan
        if generic is not None:
            assert {est.names[i] for i in plan.generic} == generic


def test_normalized_closed_form_equals_autograd():
    """The closed form on per-unit gradients (pullback_closed.dense) against autograd's
    pullback, every dim and clamp; other computed weights are not taken."""
    from fimfast import pullback_closed

    g = torch.Generator().manual_seed(7)
    v = torch.randn(4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(5, 4, 3, 2, generator=g, dtype=torch.float64)
    for W in (F.normalize(v, dim=0), F.normalize(v, dim=-1), F.normalize(v, dim=1, eps=1e-6),
              v / v.norm(dim=(0, 2), keepdim=True), v / v.norm(),
              v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp(min=1e-9)):
        want, = torch.autograd.grad(W, [v], D, retain_graph=True, is_grads_batched=True)
        got, = pullback_closed.dense(W, D, [v])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for W in (v / v.norm(dim=1, keepdim=True).clamp(max=1.0), F.normalize(v, p=1, dim=0),
              v / (v.norm(dim=1, keepdim=True) + 1e-3), v.detach() / v.norm(dim=0),
              2 * F.normalize(v, dim=0), F.normalize(v * 2, dim=0), v / v.norm(dim=2)[..., None]):
        assert pullback_closed.normalized_of(W) is None


def test_float32_cosine_head_within_float32_rounding():
    """The closed form expands a square (docs/math.md §4): in float32, against the float64
    oracle, within the float32 tolerance, also with a class direction close to the features of
    the samples (where the expansion cancels most)."""
    case = _case("matmul_cols_of_storage")
    with torch.no_grad():
        h = _feat(case.model, case.batch[0])
        case.model.W[:, 0] = h[0] + 1e-3 * case.model.W[:, 0]  # sample 0 on class 0's direction
    ref = oracle(case, "exact")
    from cases import run_case

    got, est = run_case(case.to(torch.float32), "exact")
    assert not est._persample.last_plan.generic
    assert rel_error(got, ref) <= DET_REL_F32 * 100


def test_second_step_reuses_the_plan_of_a_functional_call_on_a_computed_weight(monkeypatch):
    """The call on ``F.normalize(W)`` (a new tensor at every forward) keeps its site, and so its
    plan, from step to step: the independence probe runs once."""
    from cases import run_case

    from fimfast.persample import probe

    calls = []
    real = probe._surviving_dims
    monkeypatch.setattr(probe, "_surviving_dims", lambda *a: calls.append(1) or real(*a))
    case = _case("matmul_cols_of_storage")
    _, est = run_case(case, "exact")
    plans = dict(est._persample._plans)
    est.step(case.batch)
    est.step(case.batch)
    assert est._persample._plans.keys() == plans.keys() and len(calls) == 1
    assert rel_error({k: v / 3 for k, v in est.result().items()}, oracle(case)) <= DET_REL_F64


class Holder(nn.Module):
    """A parametrized weight held by a module without a rule, read by ``x @ W``."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = _p(*shape)


def _other_forms(kind: str) -> nn.Module:
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    if kind == "weight_norm_columns":  # g per input column of an nn.Linear's (O, I) weight
        return nn.Sequential(nn.Linear(4, D), nn.Tanh(), P.weight_norm(nn.Linear(D, C), dim=1))
    if kind == "weight_norm_matmul":  # W stored (I, O), one g per output: dim=1 of storage
        return Fn(lambda s, x: torch.tanh(s.a(x)) @ s.h.weight, a=nn.Linear(4, D),
                  h=P.weight_norm(Holder(D, C), dim=1))
    return Fn(lambda s, x: torch.tanh(s.a(x)) @ s.h.weight, a=nn.Linear(4, D),
              h=P.spectral_norm(Holder(D, C)).eval())


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("kind", ["weight_norm_columns", "weight_norm_matmul", "spectral_matmul"])
def test_the_other_closed_forms_by_columns_and_through_matmul(kind, quantity, monkeypatch):
    """Weight norm by columns and weight norm and spectral norm of a weight read by ``x @ W``
    (stored ``(I, O)``) take the closed form too."""
    model = _other_forms(kind).double()
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    case = classifier_case(model, (x, torch.tensor([0, 1, 2, 0, 1])), C, kind)
    ref = oracle(case, quantity)
    originals = [v for k, v in ref.items() if "original" in k]
    assert originals and all(v.abs().sum() > 0 for v in originals)
    _no_backward_of_f(monkeypatch, False)
    est = check_fast_twice(case, quantity, ref, DET_REL_F64)
    assert est._persample.last_plan.pullbacks
