"""Weights computed from parameters (fimfast/functional_computed.py) used by ``x @ W``, ``W @
x``, ``F.conv1d/2d/3d`` and ``torch.einsum`` in a functional call, and biases computed from
parameters in ``F.linear``: a cosine classifier on ``F.normalize(W)``, weight-standardized
convolutions, a low-rank bias. The call's rule gives the per-sample
gradients of ``W``, pulled back to the parameters (fimfast/pullback.py); every result is checked
against the float64 oracle (tests/oracle.py), with the oracle's Fisher of the parameters not
zero, and no parameter on the generic path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import Fn, check_fast_twice, check_monte_carlo_same_seed, classifier_case, run_case
from oracle import oracle, row_jacobians
from tolerances import DET_REL_F64
from torch import nn

N, C = 5, 3


def _p(*shape) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.5)


def _standardized(W: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, W.dim()))
    return (W - W.mean(dims, keepdim=True)) / (W.var(dims, keepdim=True) + 1e-2).sqrt()


def _conv(s, x, nsp: int, **kw):
    f = (F.conv1d, F.conv2d, F.conv3d)[nsp - 1]
    return s.o(torch.tanh(f(x, _standardized(s.W), s.b, **kw)).flatten(1))


MODELS = {
    # name: (model, input shape, parameters whose Fisher is checked not zero)
    "cosine_matmul": (lambda: Fn(lambda s, x: 3.0 * (F.normalize(torch.tanh(s.a(x)), dim=-1)
                                                      @ F.normalize(s.W, dim=0)),
                                 a=nn.Linear(6, 6), W=_p(6, C)), (N, 6), ["W"]),
    "cosine_matmul_tokens": (lambda: Fn(lambda s, x: (torch.tanh(s.a(x)) @ F.normalize(
        s.W, dim=0)).mean(1), a=nn.Linear(4, 4), W=_p(4, C)), (N, 3, 4), ["W"]),
    "cosine_einsum": (lambda: Fn(lambda s, x: torch.einsum(
        "nd,cd->nc", torch.tanh(s.a(x)), F.normalize(s.W, dim=-1)), a=nn.Linear(6, 6),
        W=_p(C, 6)), (N, 6), ["W"]),
    "cosine_left_matmul": (lambda: Fn(lambda s, x: (F.normalize(s.W, dim=1) @ torch.tanh(
        s.a(x)).unsqueeze(-1)).squeeze(-1), a=nn.Linear(6, 6), W=_p(C, 6)), (N, 6), ["W"]),
    "cosine_left_matmul_tokens": (lambda: Fn(lambda s, x: (F.normalize(s.W, dim=0) @ torch.tanh(
        s.a(x)).reshape(N, 4, 2)).sum(-1), a=nn.Linear(6, 8), W=_p(C, 4)), (N, 6), ["W"]),
    "normalized_bias": (lambda: Fn(lambda s, x: F.linear(torch.tanh(s.a(x)), s.W, F.normalize(
        s.b, dim=0)), a=nn.Linear(6, 6), W=_p(C, 6), b=_p(C)), (N, 6), ["W", "b"]),
    "low_rank_bias_cosine_weight": (lambda: Fn(lambda s, x: F.linear(torch.tanh(s.a(x)),
                                                                      F.normalize(s.W, dim=1),
                                                                      s.B @ s.c),
                                               a=nn.Linear(6, 6), W=_p(C, 6), B=_p(C, 2),
                                               c=_p(2)), (N, 6), ["W", "B", "c"]),
    "ws_conv1d": (lambda: Fn(lambda s, x: _conv(s, x, 1, padding=1), W=_p(4, 2, 3), b=_p(4),
                             o=nn.Linear(4 * 6, C)), (N, 2, 6), ["W", "b"]),
    "ws_conv2d_groups_same": (lambda: Fn(lambda s, x: _conv(s, x, 2, padding="same", groups=2),
                                         W=_p(4, 1, 3, 3), b=_p(4), o=nn.Linear(4 * 16, C)),
                              (N, 2, 4, 4), ["W", "b"]),
    "ws_conv2d_tanh_bias": (lambda: Fn(lambda s, x: s.o(torch.tanh(F.conv2d(
        x, _standardized(s.W), torch.tanh(s.b), padding=1)).flatten(1)), W=_p(3, 2, 3, 3),
        b=_p(3), o=nn.Linear(3 * 16, C)), (N, 2, 4, 4), ["W", "b"]),
    "ws_conv3d_nobias": (lambda: Fn(lambda s, x: _conv(s, x, 3, stride=2), W=_p(2, 1, 2, 2, 2),
                                    b=None, o=nn.Linear(2 * 8, C)), (N, 1, 5, 5, 5), ["W"]),
}


def _case(name: str):
    build, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    return classifier_case(model, (x, y), C, name)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_computed_weight_call_takes_the_rules(name, quantity):
    case = _case(name)
    ref = oracle(case, quantity)
    for k in MODELS[name][2]:
        assert ref[k].abs().sum() > 0, k  # not a detached use
    est = check_fast_twice(case, quantity, ref, DET_REL_F64)
    assert est._persample.last_plan.pullbacks


@pytest.mark.parametrize("name", ["cosine_matmul", "ws_conv2d_groups_same", "cosine_einsum"])
def test_computed_weight_call_monte_carlo_same_seed(name):
    est = check_monte_carlo_same_seed(_case(name), row_jacobians(_case(name)), DET_REL_F64)
    assert not est._persample.last_plan.generic


def _conv_tanh_bias(s, x, masked: bool):
    x = x.view(N, 2, 3)
    W = s.K * s.k if masked else s.K
    return s.o(torch.tanh(F.conv1d(x, W, torch.tanh(s.b) * 2.0, padding=1)).flatten(1))


ELEMENTWISE_BIAS = {
    # F.linear's bias an elementwise function of a 1-D parameter: the bias's Vec times ds/db
    "tanh_bias": lambda s, x: F.linear(torch.tanh(s.a(x)), s.W, torch.tanh(s.b)),
    "softplus_exp_bias": lambda s, x: F.linear(torch.tanh(s.a(x)), s.W,
                                               F.softplus(s.b) * s.b.exp().clamp(max=50.0)),
    "scaled_bias_weight_mask": lambda s, x: F.linear(torch.tanh(s.a(x)), s.W * s.m,
                                                     0.5 * torch.sigmoid(s.b) - 1.0),
    "tanh_bias_cosine_weight": lambda s, x: F.linear(torch.tanh(s.a(x)), F.normalize(s.W, dim=1),
                                                     torch.tanh(s.b)),
    "conv1d_tanh_bias": lambda s, x: _conv_tanh_bias(s, x, False),
    "conv1d_masked_tanh_bias": lambda s, x: _conv_tanh_bias(s, x, True),
    "tanh_bias_tokens": lambda s, x: F.linear(torch.tanh(s.a(x)).view(N, 2, 3), s.W,
                                              torch.tanh(s.b)).mean(1),
}


def _bias_case(name: str):
    torch.manual_seed(0)
    conv = name.startswith("conv")
    model = Fn(ELEMENTWISE_BIAS[name], a=nn.Linear(6, 6), W=_p(C, 3 if "tokens" in name else 6),
               b=_p(4 if conv else C), K=_p(4, 2, 3), o=nn.Linear(12, C)).double()
    model.register_buffer("m", (torch.rand(C, 6, dtype=torch.float64) > 0.3).double())
    model.register_buffer("k", (torch.rand(4, 2, 3, dtype=torch.float64) > 0.3).double())
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    return classifier_case(model, (x, y), C, name)


def _unused(name: str) -> frozenset:
    if name.startswith("conv"):
        return frozenset({"a.weight", "a.bias", "W"})
    return frozenset({"K", "o.weight", "o.bias"})


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(ELEMENTWISE_BIAS))
def test_elementwise_function_bias_takes_the_rules(name, quantity):
    case = _bias_case(name)
    ref = oracle(case, quantity)
    weight = "K" if name.startswith("conv") else "W"
    assert ref["b"].abs().sum() > 0 and ref[weight].abs().sum() > 0
    est = check_fast_twice(case, quantity, ref, DET_REL_F64, unused=_unused(name))
    assert not est._persample.last_plan.generic


def test_elementwise_function_bias_monte_carlo_same_seed():
    case = _bias_case("softplus_exp_bias")
    est = check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_elementwise_function_bias_and_the_parameter_itself_exact(quantity):
    """``tanh(b)`` as the bias and ``b`` itself added to the logits: two uses of ``b`` with
    different chains, which the engine sends to the generic path: still the oracle's numbers."""
    from oracle import rel_error

    torch.manual_seed(0)
    model = Fn(lambda s, x: F.linear(torch.tanh(s.a(x)), s.W, torch.tanh(s.b)) + s.b,
               a=nn.Linear(6, 6), W=_p(C, 6), b=_p(C)).double()
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(13))
    case = classifier_case(model, (x, y), C, "tanh_bias_and_raw")
    ref = oracle(case, quantity)
    assert ref["b"].abs().sum() > 0
    got, _ = run_case(case, quantity)
    assert rel_error(got, ref) < DET_REL_F64
