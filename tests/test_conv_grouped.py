"""Grouped and depthwise convolutions whose weight's per-sample squares come from a convolution
backward per column (fimfast/rules/conv_grouped.py) instead of the unfolded patches: every dim,
stride, dilation, padding and padding mode, with and without bias, against the float64 oracle
for EXACT (two classes: two columns), EMPIRICAL and MONTE_CARLO (the same seed as the generic
path); the patches still taken for more columns, for a weight shared by two calls and for one
group."""

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
    "grouped2d_same_even_kernel": (lambda: nn.Conv2d(
        4, 6, (3, 2), dilation=(2, 1), padding="same", groups=2), (4, 6, 5)),
    "grouped2d_replicate_nobias": (lambda: nn.Conv2d(
        6, 6, 3, padding=2, padding_mode="replicate", groups=3, bias=False), (6, 5, 5)),
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


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_grouped_conv_by_backward_matches_the_oracle(name, quantity, calls):
    case = _case(name)
    ref = oracle(case, quantity)
    assert float(ref["0.weight"].abs().sum()) > 0  # the weight reaches the logits
    check_fast_twice(case, quantity, ref, DET_REL_F64)
    assert calls


@pytest.mark.parametrize("name", sorted(CONVS))
def test_grouped_conv_monte_carlo_same_seed(name, calls):
    case = _case(name)
    check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert calls


@pytest.mark.parametrize("name", ["dw2d_circular_stride", "grouped2d_same_even_kernel"])
def test_float32_by_backward_matches_the_oracle(name, calls):
    case = _case(name, dtype=torch.float32)
    for quantity in ("exact", "empirical"):
        got, _ = run_case(case, quantity)
        assert rel_error(got, oracle(case, quantity)) <= 1e-5
    assert calls


@pytest.mark.parametrize("name", ["dw2d_circular_stride", "dw3d_stride"])
def test_more_columns_take_the_patches(name, calls):
    case = _case(name, C=4)  # four columns of EXACT
    check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)
    assert not calls
    check_fast_twice(case, "empirical", oracle(case, "empirical"), DET_REL_F64)
    assert calls  # one column: the backward


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

    model, (x, y) = small_cnn("groupnorm_cnn", 6)
    case = classifier_case(copy.deepcopy(model).double(), (x.double(), y), 10, "groupnorm_cnn")
    if quantity == "empirical":
        check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64)
    else:
        check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert calls
