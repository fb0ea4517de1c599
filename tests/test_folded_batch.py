"""Linear layers and per-position norms applied to a batch folded into the first dim
(fimfast/rules/linear.py ``folded``): ``fc(h.reshape(-1, d))`` on ``(N, T, d)`` activations, a
batch of images cut into windows ``(N * windows, positions, C)`` (as Swin's attention), a logits
layer on the flattened tokens, LayerNorm and RMSNorm on flattened tokens. The call is recorded
unfolded, ``(N, k, ...)``, and the probe checks that each sample's gradient stays in its own rows;
every estimate is checked against the float64 per-row oracle (tests/oracle.py). A dim folded the
other way (time-major ``(T * N, d)``), or rows shared by the samples, fail that check: those
layers take the generic path, exactly."""

from __future__ import annotations

import pytest
import torch
from cases import Case, check_fast_twice, check_monte_carlo_same_seed, classifier_case, run_case
from oracle import oracle, row_jacobians
from oracle import rel_error as _rel
from tolerances import DET_REL_F64
from torch import nn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Flat(nn.Module):
    """``(N, T, d)`` through two Linears on the ``(N * T, d)`` flattening, then a mean over the
    tokens; ``major="time"`` flattens ``(T, N, d)`` instead (the generic path)."""

    def __init__(self, d: int = 4, h: int = 5, C: int = 3, major: str = "sample"):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, C)
        self.major = major

    def forward(self, x):
        N, T, d = x.shape
        if self.major == "time":
            x = x.transpose(0, 1)
        h = torch.tanh(self.a(x.reshape(-1, d)))
        h = torch.tanh(self.b(h)).reshape(*x.shape[:2], -1)
        if self.major == "time":
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class FlatNorms(nn.Module):
    """LayerNorm and RMSNorm (and Linears) on the ``(N * T, d)`` flattening of ``(N, T, d)``."""

    def __init__(self, d: int = 4, C: int = 3):
        super().__init__()
        self.a, self.ln, self.rms = nn.Linear(d, d), nn.LayerNorm(d), nn.RMSNorm(d)
        self.head = nn.Linear(d, C)
        with torch.no_grad():
            for p in (self.ln.weight, self.ln.bias, self.rms.weight):
                p.add_(0.3 * torch.randn(p.shape, generator=_gen(9)))

    def forward(self, x):
        N, T, d = x.shape
        h = self.rms(torch.tanh(self.ln(self.a(x.reshape(N * T, d)))))
        return self.head(h.reshape(N, T, d).mean(1))


class Windows(nn.Module):
    """Swin-style: ``(N, H, W, C)`` cut into ``2 x 2`` windows, ``(N * 4, 4, C)``, a Linear and a
    softmax attention inside each window, the windows put back, a head on the mean."""

    def __init__(self, c: int = 3, C: int = 3):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(c, 3 * c), nn.Linear(c, c), nn.Linear(c, C)

    def forward(self, x):  # (N, 4, 4, c)
        N, H, W, c = x.shape
        w = x.view(N, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(N * 4, 4, c)
        q, k, v = self.qkv(w).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        out = self.proj(a).view(N, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, c)
        return self.head(torch.tanh(out + x).mean((1, 2)))


class TokenHead(nn.Module):
    """Token-level logits from a head on the flattened tokens: ``head(h.reshape(-1, d))``
    viewed as ``(N, T, C)``."""

    def __init__(self, d: int = 4, C: int = 3):
        super().__init__()
        self.a, self.head = nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, x):
        N, T, d = x.shape
        h = torch.tanh(self.a(x)).reshape(N * T, d)
        return self.head(h).view(N, T, -1)


class FlatLogits(nn.Module):
    """``(N * T, C)`` logits of flattened tokens, one label per row: every row is a sample, so
    the layers on ``(N * T, d)`` are not a folded batch (the logits layer keeps its closed
    form)."""

    def __init__(self, d: int = 4, C: int = 3):
        super().__init__()
        self.a, self.head = nn.Linear(d, 6), nn.Linear(6, C)

    def forward(self, x):  # (N, T, d)
        return self.head(torch.tanh(self.a(x.reshape(-1, x.shape[-1]))))


class SeqFirst(nn.Module):
    """A sequence-first Linear, ``(T, N, d)`` with ``T = 2 N``: its first dim divides by the batch
    size but the batch is its second dim (the probe finds it there)."""

    def __init__(self, d: int = 4, C: int = 3):
        super().__init__()
        self.a, self.head = nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, x):  # (N, T, d)
        return self.head(torch.tanh(self.a(x.transpose(0, 1))).mean(0))


class Shared(nn.Module):
    """A Linear on rows shared by every sample (a table of ``2 N`` learned rows, ``N = 5``),
    mixed into each sample: its output's first dim is ``N * 2`` but no sample owns a row."""

    def __init__(self, d: int = 4, C: int = 3):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, d, generator=_gen(3)))
        self.a, self.head = nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, x):  # (N, d)
        keys = torch.tanh(self.a(self.table))  # (10, d)
        return self.head(torch.softmax(x @ keys.T, -1) @ keys)


def _case(name: str, N: int = 5) -> Case:
    g = _gen(11)
    torch.manual_seed(0)
    if name == "flat_logits":
        x = torch.randn(N, 3, 4, generator=g)
        labels = torch.randint(0, 3, (N * 3,), generator=g)
        return Case(name, FlatLogits(), (x, labels), lambda m, b: m(b[0]),
                    torch.ones(N * 3, dtype=torch.bool), labels, "categorical", 3).to(torch.float64)
    if name == "token_head":
        x = torch.randn(N, 4, 4, generator=g)
        labels = torch.randint(0, 3, (N, 4), generator=g)
        labels[0, 1] = -100
        return Case(name, TokenHead(), (x, labels), lambda m, b: m(b[0]), labels != -100, labels,
                    "categorical", 3).to(torch.float64)
    if name.startswith("windows"):  # windows_n4: 4 samples of 4 windows of 4 positions
        N = 4 if name == "windows_n4" else N
        model, x = Windows(), torch.randn(N, 4, 4, 3, generator=g)
    elif name == "norms":
        model, x = FlatNorms(), torch.randn(N, 3, 4, generator=g)
    elif name == "seq_first":
        model, x = SeqFirst(), torch.randn(N, 2 * N, 4, generator=g)
    elif name == "shared":
        model, x = Shared(), torch.randn(N, 4, generator=g)
    else:  # flat, flat_t_eq_n (T == N: two candidate dims), time_major
        T = N if name == "flat_t_eq_n" else 3
        model = Flat(major="time" if name == "time_major" else "sample")
        x = torch.randn(N, T, 4, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return classifier_case(model, (x, y), 3, name).to(torch.float64)


FOLDED = ["flat", "flat_t_eq_n", "windows", "windows_n4", "token_head", "seq_first", "norms",
          "flat_logits"]


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", FOLDED)
def test_folded_batch_takes_the_rule_and_matches_the_oracle(name, quantity):
    case = _case(name)
    check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64)


@pytest.mark.parametrize("name", ["flat", "windows", "norms"])
def test_folded_batch_monte_carlo_same_seed(name):
    case = _case(name)
    est = check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert not est._persample.last_plan.generic


def test_rows_of_flattened_tokens_are_the_samples_and_the_head_stays_closed_form():
    case = _case("flat_logits")
    _, est = run_case(case, "exact")
    plan = est._persample.last_plan
    assert plan.head is not None and plan.head.module is case.model.head
    assert [t.shape for c in plan.calls for t in c.taps] == [torch.Size([15, 6])]


def test_one_sample_unfolds_every_row():
    case = _case("flat", N=1)
    got, est = run_case(case, "exact")
    assert not est._persample.last_plan.generic
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name,generic", [("time_major", {"a.weight", "a.bias", "b.weight",
                                                          "b.bias"}),
                                          ("shared", {"a.weight", "a.bias", "table"})])
def test_rows_not_owned_by_one_sample_stay_generic_and_exact(name, generic, quantity):
    case = _case(name)
    got, est = run_case(case, quantity)
    assert {est.names[i] for i in est._persample.last_plan.generic} == generic
    assert _rel(got, oracle(case, quantity)) <= DET_REL_F64


def test_the_model_and_its_hooks_see_the_folded_output():
    import fimfast

    model = Flat().double()
    x = torch.randn(4, 3, 4, dtype=torch.float64, generator=_gen(2))
    seen = []
    model.b.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    est = fimfast.DiagFisher(model, "empirical")
    est.step((x, torch.zeros(4, dtype=torch.long)))
    assert seen[-1] == (12, 5)  # a's output, as the model made it
    assert not est._persample.last_plan.generic
