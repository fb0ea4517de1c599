"""Depthwise convolutions whose weight's per-sample squares come from a convolution backward per
column (fimfast/rules/conv_grouped.py) instead of the unfolded patches. The arithmetic is checked
on every dim, stride, dilation, padding and padding mode, channel multiplier, with and without
bias, against the float64 oracle for EXACT, EMPIRICAL and MONTE_CARLO (the same seed as the
generic path), with the geometries it serves by default widened to all of them (``wide``) and
two columns allowed; by default it serves the 2-D kernels up to 3 x 3 of one output channel a
group, one column and 16 samples or more, and the patches everything else: more columns, fewer
samples, a weight shared by two calls, grouped and plain convolutions."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import check_fast_twice, check_monte_carlo_same_seed, classifier_case, run_case
from oracle import oracle, rel_error, row_jacobians
from tolerances import DET_REL_F64
from torch import nn

from fimfast.rules import conv_grouped

N = 5

CONVS = {
    "dw1d_stride_bias": (lambda: nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=4), (4, 11)),
    "dw1d_mult_dilated_reflect": (lambda: nn.Conv1d(
        4, 8, 3, dilation=2, padding="same", padding_mode="reflect", groups=4), (4, 9)),
    "dw2d_circular_stride": (lambda: nn.Conv2d(
        4, 4, 3, stride=2, padding=1, padding_mode="circular", groups=4), (4, 7, 6)),
    "dw2d_mult_same_even_kernel": (lambda: nn.Conv2d(
        2, 6, (3, 2), dilation=(2, 1), padding="same", groups=2), (2, 6, 5)),
    "dw2d_replicate_nobias": (lambda: nn.Conv2d(
        3, 3, 3, padding=2, padding_mode="replicate", groups=3, bias=False), (3, 5, 5)),
    "dw2d_valid_dilated_stride": (lambda: nn.Conv2d(
        3, 3, 3, stride=(2, 1), dilation=(1, 2), groups=3), (3, 8, 9)),
    "dw3d_stride": (lambda: nn.Conv3d(2, 2, 3, stride=(1, 2, 1), padding=1, groups=2),
                    (2, 4, 5, 3)),
}


def _model(name: str, C: int) -> nn.Sequential:
    build, shape = CONVS[name]
    torch.manual_seed(0)
    conv = build()
    out = conv(torch.zeros(1, *shape)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out, C))


def _case(name: str, C: int = 2, dtype=torch.float64):
    model = _model(name, C).to(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, *CONVS[name][1], generator=g).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return classifier_case(model, (x, y), C, name)


@pytest.fixture
def calls(monkeypatch) -> list:
    """The shapes of ``P`` that :meth:`GroupedInput.sq` squared."""
    seen: list = []
    sq = conv_grouped.GroupedInput.sq

    def spy(self, P):
        seen.append(tuple(P.shape))
        return sq(self, P)

    monkeypatch.setattr(conv_grouped.GroupedInput, "sq", spy)
    return seen


@pytest.fixture
def wide(monkeypatch, calls) -> list:
    """:fixture:`calls`, with every depthwise geometry and up to two columns taken."""
    monkeypatch.setattr(conv_grouped, "takes", lambda m: m.groups > 1 and m.in_channels == m.groups)
    monkeypatch.setattr(conv_grouped, "MAX_COLUMNS", 2)
    monkeypatch.setattr(conv_grouped, "MIN_SAMPLES", 1)
    return calls


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_depthwise_conv_by_backward_matches_the_oracle(name, quantity, wide):
    case = _case(name)
    ref = oracle(case, quantity)
    assert float(ref["0.weight"].abs().sum()) > 0  # the weight reaches the logits
    check_fast_twice(case, quantity, ref, DET_REL_F64)
    assert wide


@pytest.mark.parametrize("name", sorted(CONVS))
def test_depthwise_conv_monte_carlo_same_seed(name, wide):
    case = _case(name)
    check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert wide


@pytest.mark.parametrize("name", ["dw2d_circular_stride", "dw2d_mult_same_even_kernel"])
def test_float32_by_backward_matches_the_oracle(name, wide):
    case = _case(name, dtype=torch.float32)
    for quantity in ("exact", "empirical"):
        got, _ = run_case(case, quantity)
        assert rel_error(got, oracle(case, quantity)) <= 1e-5
    assert wide


# the geometries the backward serves by default (2-D, kernel up to 3 x 3, no dilation, one
# output channel a group)
DEFAULT = {"dw2d_circular_stride", "dw2d_replicate_nobias"}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_default_choice_one_column_of_small_2d_kernels(name, calls, monkeypatch):
    case = _case(name, C=4)
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    assert not calls  # five samples: the patches
    monkeypatch.setattr(conv_grouped, "MIN_SAMPLES", N)
    check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)
    assert not calls  # four columns of EXACT: the patches
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    assert bool(calls) == (name in DEFAULT)


def test_grouped_conv_takes_the_patches(wide):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(54, 2)).double()
    x = torch.randn(N, 4, 5, 5, dtype=torch.float64)
    case = classifier_case(model, (x, torch.randint(0, 2, (N,))), 2, "grouped")
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    assert not wide  # two input channels a group


class Twice(nn.Module):
    """One depthwise convolution applied twice (a weight shared by two calls)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.o = nn.Linear(3 * 5 * 5, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.c(torch.tanh(self.c(x)))).flatten(1))


def test_shared_weight_and_one_group(calls):
    torch.manual_seed(0)
    x = torch.randn(N, 3, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (N,))
    case = classifier_case(Twice().double(), (x, y), 2, "twice")
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)).double()
    calls.clear()
    case = classifier_case(model, (x, y), 2, "one_group")
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    assert not calls  # one group: the patches or windows


@pytest.mark.parametrize("quantity", ["empirical", "monte_carlo"])
def test_small_cnn_with_depthwise_conv(quantity, calls):
    from benchmarks.bench_persample_cost import small_cnn

    model, (x, y) = small_cnn("groupnorm_cnn", 16)
    case = classifier_case(copy.deepcopy(model).double(), (x.double(), y), 10, "groupnorm_cnn")
    if quantity == "empirical":
        check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64)
    else:
        check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert calls
