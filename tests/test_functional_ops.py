"""More functional uses of parameters (fimfast/functional_ops.py): elementwise functions of a
parameter (the chain rule), functional norms, ``F.conv3d`` and transposed convolutions,
contractions (``einsum``, ``bmm``, ``baddbmm``, ``addmm``), ``W @ x``, ``F.embedding_bag`` and
lookups shared by the batch, against the float64
brute-force oracle (tests/oracle.py); and the uses still not recognised, which must stay on the
generic path, exactly.

As in tests/test_functional_capture.py: EXACT and EMPIRICAL equal the oracle to rounding,
MONTE_CARLO (one draw) equals the oracle's empirical Fisher at the labels the draw samples (same
seed) and the generic path with the same seed (two draws), and no parameter of the case takes the
generic path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from cases import Case, check_monte_carlo_same_seed, run_case
from oracle import oracle_flat, row_jacobians
from oracle import rel_error as _rel
from tolerances import DET_REL_F64
from torch import nn

from fimfast import DiagFisher
from fimfast.rules.functional import Site


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _param(*shape, seed: int, scale: float = 0.4, shift: float = 0.0) -> nn.Parameter:
    return nn.Parameter(shift + scale * torch.randn(*shape, generator=_gen(seed)))


# --------------------------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------------------------- #
class Scales(nn.Module):
    """Elementwise functions of parameters as scales: a learnable log-temperature
    (``logits * logit_scale.exp().clamp(max=...)``), ``sigmoid``/``softplus``/``tanh`` gains, a
    view of ``exp(p)``, ``1 + p``, ``2 / p``, ``1 - p``, ``p ** 2``, ``-p``, one derived gain
    used twice, and ``1 - r`` and ``-n`` next to a plain use of ``r`` and ``n`` (their per-sample
    gradients add before the square: the sign of the chain factor counts)."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, C)
        self.gate, self.beta = _param(d, seed=40), _param(d, seed=41)
        self.a, self.v = _param(d, seed=42), _param(d, seed=43, scale=0.2)
        self.g1, self.q = _param(d, seed=44), _param(d, seed=45, scale=0.1, shift=1.5)
        self.r, self.w = _param(d, seed=46), _param(d, seed=47, shift=0.5)
        self.n, self.twice = _param(d, seed=48), _param(d, seed=49)
        self.logit_scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        h = torch.tanh(self.fc(x)) * torch.sigmoid(self.gate)
        h = F.softplus(self.beta) * h + torch.tanh(self.a) - self.v.exp().view(1, -1) * h
        h = torch.tanh((1 + self.g1) * h + 2.0 / self.q - (1 - self.r) * h)
        s = self.twice.square()
        h = h * self.w ** 2 + (-self.n) * h * h + s * h + s
        h = torch.tanh(h + self.n * h + self.r * h)
        return self.head(h) * self.logit_scale.exp().clamp(max=100.0)


class Norms(nn.Module):
    """``F.layer_norm`` (weight and bias, over the last two dims), ``F.rms_norm`` (a weight of
    ``1 + g``), ``F.group_norm`` of ``(N, C, L)`` (weight and bias)."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, C)
        self.ln_w, self.ln_b = _param(2, d, seed=50, shift=1.0), _param(2, d, seed=51)
        self.rms_g = _param(2 * d, seed=52)
        self.gn_w, self.gn_b = _param(4, seed=53, shift=1.0), _param(4, seed=54)

    def forward(self, x):
        N = x.shape[0]
        h = self.fc(x).view(N, 2, -1)
        h = torch.tanh(F.layer_norm(h, h.shape[1:], self.ln_w, self.ln_b, 1e-5)).flatten(1)
        h = F.rms_norm(h, (h.shape[-1],), 1 + self.rms_g, 1e-6)
        h = F.group_norm(h.view(N, 4, 3), 2, self.gn_w, self.gn_b)
        return self.head(torch.tanh(h.flatten(1)))


class Convs(nn.Module):
    """``F.conv3d`` (padding, bias), ``F.conv_transpose1d`` (stride, padding, output padding,
    bias), ``F.conv_transpose2d`` (groups 2, dilation 2, stride 2, no bias), ``F.conv_transpose3d``
    (bias only a parameter: the weight a buffer)."""

    def __init__(self):
        super().__init__()
        self.k3, self.b3 = _param(2, 1, 3, 3, 3, seed=55), _param(2, seed=56)
        self.kt1, self.bt1 = _param(2, 3, 3, seed=57), _param(3, seed=58)
        self.kt2 = _param(2, 1, 2, 2, seed=59)
        self.register_buffer("kt3", 0.3 * torch.randn(1, 1, 2, 2, 2, generator=_gen(60)))
        self.bt3 = _param(1, seed=61)
        self.head = nn.Linear(2 * 27 + 3 * 6 + 2 * 25 + 27, 3)

    def forward(self, x):  # (N, 1, 3, 3, 3)
        N = x.shape[0]
        a = torch.tanh(F.conv3d(x, self.k3, self.b3, padding=1))  # (N, 2, 3, 3, 3)
        b = torch.tanh(F.conv_transpose1d(x.view(N, 1, 27)[:, :, :6].reshape(N, 2, 3), self.kt1,
                                          self.bt1, stride=2, padding=1, output_padding=1))
        c = torch.tanh(F.conv_transpose2d(x[:, :, 0, :2, :2].expand(N, 2, 2, 2), self.kt2,
                                          None, 2, 0, 0, 2, 2))  # (N, 2, 5, 5)
        d = torch.tanh(F.conv_transpose3d(x[:, :, :2, :2, :2], self.kt3, self.bt3))
        return self.head(torch.cat([t.flatten(1) for t in (a, b, c, d)], 1))


class Contractions(nn.Module):
    """``einsum`` (a linear map), ``torch.bmm`` with per-head weights (the batch on dim 1),
    ``torch.baddbmm`` with a parameter added, ``torch.addmm`` as ``x @ W + b`` and with
    ``alpha``/``beta``, ``einsum`` with a per-slot table (the batch in the parameter's
    subscripts), and ``W @ x``."""

    def __init__(self, N: int = 5, d: int = 6, C: int = 4):
        super().__init__()
        self.We = _param(d, d, seed=62)
        self.Wb, self.bb = _param(2, 3, 3, seed=63), _param(2, 1, 3, seed=64)
        self.register_buffer("Wd", 0.4 * torch.randn(2, 3, 3, generator=_gen(79)))
        self.Wa, self.ba = _param(d, d, seed=65), _param(d, seed=66)
        self.Wc, self.bc = _param(d, d, seed=67), _param(d, seed=68)
        self.slot = _param(N, d, seed=69)
        self.Wl, self.Wm = _param(d, d, seed=70), _param(d, d, seed=71)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        N = x.shape[0]
        h = torch.tanh(torch.einsum("ni,oi->no", x, self.We))
        hh = h.view(N, 2, 3).transpose(0, 1)  # (2, N, 3)
        hh = torch.tanh(torch.bmm(hh, self.Wb))
        hh = torch.baddbmm(self.bb, hh, self.Wd)  # the added bias the only parameter
        h = torch.tanh(hh.transpose(0, 1).reshape(N, 6))
        h = torch.tanh(torch.addmm(self.ba, h, self.Wa))
        h = torch.tanh(torch.addmm(self.bc, h, self.Wc, beta=0.5, alpha=2.0))
        h = torch.tanh(torch.einsum("nd,nd->nd", h, self.slot))
        h = torch.tanh((self.Wl @ h.T).T)
        h = torch.tanh(self.Wm @ h.unsqueeze(-1)).squeeze(-1)
        return self.head(h)


class BmmBias(nn.Module):
    """``torch.baddbmm(b, x, W)`` with both a parameter: one call, two uses."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.W, self.b = _param(2, 3, 3, seed=72), _param(2, 1, 3, seed=73)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        N = x.shape[0]
        hh = torch.baddbmm(self.b, x.view(N, 2, 3).transpose(0, 1), self.W)
        return self.head(torch.tanh(hh.transpose(0, 1).reshape(N, 6)))


class SharedLookup(nn.Module):
    """Positions looked up by ``F.embedding`` with ids shared by the batch, ``(1, T)`` or
    ``(T,)``, added to ``(N, T, d)`` activations; ``kind="summed"`` reduces the ``(T, d)``
    lookup over its first dim, which expanding it to the batch would change."""

    def __init__(self, kind: str, T: int = 4, d: int = 6, C: int = 4):
        super().__init__()
        self.kind = kind
        self.wpe, self.W = _param(T + 1, d, seed=74), _param(d, d, seed=75)
        self.head = nn.Linear(d, C)
        ids = torch.arange(T)
        self.register_buffer("ids", ids.unsqueeze(0) if kind == "row" else ids)

    def forward(self, x):  # (N, T, d)
        pos = F.embedding(self.ids, self.wpe)
        if self.kind == "summed":
            pos = pos.sum(0)
        h = torch.tanh(F.linear(x + pos, self.W))
        return self.head(h.mean(1))


class Bags(nn.Module):
    """``F.embedding_bag`` with bare tables, one bag per sample: ``sum`` of flat ids with offsets
    and per-sample weights, ``mean`` of 2-D ids with a ``padding_idx``, ``max``; the bags' ids
    are buffers for the batch of 5."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.Ts, self.Tm, self.Tx = (_param(7, d, seed=s) for s in (76, 77, 78))
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, C)
        self.register_buffer("flat", torch.tensor([1, 2, 2, 0, 5, 3, 3, 6, 1]))
        self.register_buffer("offsets", torch.tensor([0, 3, 4, 4, 7]))
        self.register_buffer("psw", torch.linspace(0.5, 1.5, 9))
        self.register_buffer("ids", torch.tensor([[1, 2, 0], [0, 0, 0], [4, 4, 5], [6, 1, 2],
                                                  [3, 3, 3]]))

    def forward(self, x):
        a = F.embedding_bag(self.flat, self.Ts, self.offsets, mode="sum",
                            per_sample_weights=self.psw)
        b = F.embedding_bag(self.ids, self.Tm, mode="mean", padding_idx=0)
        c = F.embedding_bag(self.ids, self.Tx, mode="max")
        return self.head(torch.tanh(self.fc(x) * (a + b) + c))


class Ellipses(nn.Module):
    """``einsum`` with an ellipsis: a linear map of ``(N, 2, 3)`` activations
    (``...i,oi->...o``), the same with an implicit output (``...i,io``), a per-feature gain over
    the leading dims (``n...,...->n...``), and a parameter with an ellipsis of its own
    (``oi...,ni->no...``: ``(d, d, 1)`` weight, the batch first in the output), and ellipses of
    different lengths aligned from the right (``...i,...i->...i``, ``(2, 3)`` against
    ``(N, 2, 3)``)."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, C)
        self.A, self.B = _param(3, 3, seed=90), _param(3, 3, seed=91)
        self.g, self.K = _param(2, 3, seed=92), _param(d, d, 1, seed=93)
        self.v = _param(2, 3, seed=94)

    def forward(self, x):
        N = x.shape[0]
        h = torch.tanh(self.fc(x)).view(N, 2, 3)
        h = torch.tanh(torch.einsum("...i,oi->...o", h, self.A))
        h = torch.tanh(torch.einsum("...i,io", h, self.B))
        h = torch.tanh(torch.einsum("...i,...i->...i", h, self.v))
        h = torch.einsum("n...,...->n...", h, self.g).reshape(N, 6)
        h = torch.tanh(torch.einsum("oi...,ni->no...", self.K, h)).squeeze(-1)
        return self.head(h)


class Heads(nn.Module):
    """``@`` with per-head weights of 3 dims: ``(N, 2, 1, 3) @ (2, 3, 3)``, ``(2, 3, 3) @
    (N, 2, 3, 1)`` (the weight on the left); a 2-D weight against a batch of matrices stays a
    linear map. (A weight whose size-1 dim broadcasts against the batch, ``(1, 2, 3, 3)``, takes
    the generic path.)"""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, C)
        self.Wr, self.Wl = _param(2, 3, 3, seed=95), _param(2, 3, 3, seed=96)
        self.W2 = _param(3, 3, seed=98)

    def forward(self, x):
        N = x.shape[0]
        h = torch.tanh(self.fc(x)).view(N, 2, 1, 3)
        h = torch.tanh(h @ self.Wr)  # (N, 2, 1, 3)
        h = torch.tanh(self.Wl @ h.transpose(-1, -2)).transpose(-1, -2)
        h = torch.tanh(h @ self.W2)
        return self.head(h.reshape(N, 6))


class Expands(nn.Module):
    """Parameters made one per sample: a class token expanded and concatenated to the tokens
    (as a ViT's), a learned initial state expanded along dim 1 for a time-major GRU,
    ``broadcast_to`` of ``exp(p)`` (the chain rule), ``repeat`` of a ``(1, d)`` gain along the
    batch, ``expand_as``, and one vector expanded twice in two shapes (its per-sample gradients
    add before the square)."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, C)
        self.gru = nn.GRU(3, 3)
        self.cls, self.h0 = _param(1, 1, 3, seed=110), _param(1, 1, 3, seed=111)
        self.rep, self.ea = _param(1, d, seed=112, shift=1.0), _param(d, seed=113)
        self.bt, self.twice = _param(1, 3, seed=114), _param(3, seed=115)

    def forward(self, x):
        N = x.shape[0]
        tok = torch.tanh(self.fc(x)).view(N, 2, 3)
        seq = torch.cat([self.cls.expand(N, -1, -1), tok, self.twice.expand(N, 1, 3)], 1)
        seq = seq + torch.broadcast_to(self.bt.exp(), (N, 4, 3))
        out, hn = self.gru(seq.transpose(0, 1), self.h0.expand(1, N, 3).contiguous())
        g = torch.cat([hn[-1] * self.twice.expand(N, 3), out[-1]], 1)
        g = g * self.rep.repeat(N, 1) + self.ea.expand_as(g)
        return self.head(torch.tanh(g))


# --------------------------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------------------------- #
MODELS = {"scales": Scales, "norms": Norms, "convs": Convs, "contractions": Contractions,
          "bmm_bias": BmmBias, "shared_row": lambda: SharedLookup("row"),
          "shared_flat": lambda: SharedLookup("flat"), "bags": Bags, "ellipses": Ellipses,
          "heads": Heads, "expands": Expands}
CASES = list(MODELS)
# the parameters each case uses through functional calls (all captured)
FUNCTIONAL = {
    "scales": {"gate", "beta", "a", "v", "g1", "q", "r", "w", "n", "twice", "logit_scale"},
    "norms": {"ln_w", "ln_b", "rms_g", "gn_w", "gn_b"},
    "convs": {"k3", "b3", "kt1", "bt1", "kt2", "bt3"},
    "contractions": {"We", "Wb", "bb", "Wa", "ba", "Wc", "bc", "slot", "Wl", "Wm"},
    "bmm_bias": {"W", "b"},
    "shared_row": {"wpe", "W"},
    "shared_flat": {"wpe", "W"},
    "bags": {"Ts", "Tm", "Tx"},
    "ellipses": {"A", "B", "g", "K", "v"},
    "heads": {"Wr", "Wl", "W2"},
    "expands": {"cls", "h0", "rep", "ea", "bt", "twice"},
}


def _case(name: str) -> Case:
    N, C = 5, 4
    g = _gen(200)
    torch.manual_seed(0)
    model = MODELS[name]()
    if name == "convs":
        x, C = torch.randn(N, 1, 3, 3, 3, generator=g), 3
    elif name.startswith("shared"):
        x = torch.randn(N, 4, 6, generator=g)
    else:
        x = torch.randn(N, 6, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return Case(name, model, (x, y), lambda m, b: m(b[0]), torch.ones(N, dtype=torch.bool), y,
                "categorical", C).to(torch.float64)


_RJ: dict = {}


def _oracle(case: Case, quantity: str, labels=None) -> dict[str, torch.Tensor]:
    if case.name not in _RJ:
        _RJ[case.name] = row_jacobians(case)
    rj = _RJ[case.name]
    if labels is not None:
        rj = dataclasses.replace(rj, labels=labels)
    return rj.split(oracle_flat(rj, case.likelihood, quantity))


_run = run_case


def _assert_captured(name: str, est: DiagFisher) -> None:
    plan = est._persample.last_plan
    assert not plan.generic, plan.reasons
    fast = {est.names[g.index] for g in plan.groups
            if any(isinstance(c.module, Site) for c, _ in g.members)}
    assert FUNCTIONAL[name] <= fast


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_functional_ops_match_oracle_f64(name, quantity):
    case = _case(name)
    got, est = _run(case, quantity)
    ref = _oracle(case, quantity)
    assert _rel(got, ref) <= DET_REL_F64
    _assert_captured(name, est)
    est.step(case.batch)  # the plan of the first step, bound to the second one's calls
    assert _rel({k: v / 2 for k, v in est.result().items()}, ref) <= DET_REL_F64


@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_functional_ops_monte_carlo_same_seed(name):
    case = _case(name)
    if name not in _RJ:
        _RJ[name] = row_jacobians(case)
    _assert_captured(name, check_monte_carlo_same_seed(case, _RJ[name], DET_REL_F64))


# --------------------------------------------------------------------------------------------- #
# uses still not recognised: generic path, exact
# --------------------------------------------------------------------------------------------- #
class Unrecognised(nn.Module):
    """``p`` used through a function the capture does not follow, next to a captured use of
    ``fc``: a transpose of a 3-D parameter in ``bmm``, ``exp(s)`` used by a captured product and
    also summed, ``s + 1`` modified in place before its use, ``erf(s)`` (no derivative known), a
    diagonal einsum, an ellipsis broadcast over a size-1 dim, a vector tiled by ``repeat``, a
    vector expanded into a matrix every sample multiplies by (its batch-sized dim couples the
    samples: the probe finds no batch dim)."""

    def __init__(self, kind: str, d: int = 6, C: int = 4):
        super().__init__()
        self.kind = kind
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, C)
        shape = {"diag": (d, d), "transposed_3d": (2, 3, 3), "broadcast": (1, d), "tiled": (1, 3),
                 "shared_matrix": (5,)}
        self.p = _param(*shape.get(kind, (d,)), seed=80)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.kind == "broadcast":  # p's ellipsis dim (1) broadcast against the batch
            h = torch.einsum("...i,...i->...i", h, self.p)
        elif self.kind == "transposed_3d":
            h = torch.bmm(h.view(-1, 2, 3).transpose(0, 1), self.p.transpose(1, 2))
            h = h.transpose(0, 1).reshape(-1, 6)
        elif self.kind == "diag":
            h = h * torch.einsum("ii->i", self.p)
        elif self.kind == "tiled":
            h = h * self.p.repeat(h.shape[0], 2)  # per sample, but tiled along dim 1
        elif self.kind == "shared_matrix":  # (5, 5) with a batch of 5: dim 0 is a candidate
            h = torch.cat([h[:, :5] @ self.p.expand(5, 5), h[:, 5:]], 1)
        elif self.kind == "also_summed":
            s = self.p.exp()
            h = h * s + s.sum()
        elif self.kind == "modified":
            s = self.p + 1.0
            s.mul_(2.0)  # the product must see the doubled scale
            h = h * s
        else:
            h = h * torch.erf(self.p)
        return self.head(torch.tanh(h))


UNRECOGNISED = ["broadcast", "diag", "transposed_3d", "also_summed", "modified",
                "erf", "tiled", "shared_matrix"]
# of which a weight computed from p only and broadcast into the batch (einsum("ii->i", p), p + 1
# doubled in place, erf(p)) or an operand of a contraction (p.transpose(1, 2) in bmm): pulled
# back to p (fimfast/functional_computed.py)
COMPUTED = ("diag", "modified", "erf", "transposed_3d")


@pytest.mark.parametrize("kind", UNRECOGNISED)
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_unrecognised_uses_stay_generic_and_exact(kind, quantity):
    g = _gen(7)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    case = Case(f"unrecognised_{kind}", Unrecognised(kind), (x, y), lambda m, b: m(b[0]),
                torch.ones(5, dtype=torch.bool), y, "categorical", 4).to(torch.float64)
    got, est = _run(case, quantity)
    plan = est._persample.last_plan
    if kind in COMPUTED:  # a tensor computed from p only, times the batch: p's pullback
        assert not plan.generic, plan.reasons
        assert [est.names[i] for pb in plan.pullbacks for i in pb.thetas] == ["p"]
    else:
        assert [est.names[i] for i in plan.generic] == ["p"], plan.reasons
    assert {"fc.weight", "fc.bias", "head.weight", "head.bias"} <= {est.names[i]
                                                                    for i in plan.fast}
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_shared_lookup_that_expansion_would_change_stays_generic(quantity):
    """A ``(T,)`` lookup reduced over its first dim: the checked forward's logits differ with it
    expanded, the step runs again without, and the table takes the generic path, exactly."""
    g = _gen(8)
    x, y = torch.randn(5, 4, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    case = Case("shared_summed", SharedLookup("summed"), (x, y), lambda m, b: m(b[0]),
                torch.ones(5, dtype=torch.bool), y, "categorical", 4).to(torch.float64)
    got, est = _run(case, quantity)
    assert [est.names[i] for i in est._persample.last_plan.generic] == ["wpe"]
    assert not est._persample.expand_flat
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64


def test_contraction_over_the_memory_budget_stays_generic(monkeypatch):
    """An operand whose per-sample gradients for one column (``12 N numel`` bytes) exceed
    ``FIMFAST_MEMORY_BUDGET_MB`` is left to the generic path with its call (the bias added by
    that ``addmm`` too), exactly; the linear ``addmm`` and the other captured uses are not
    concerned."""
    case = _case("contractions")
    N = case.batch[0].shape[0]
    budget = 12 * N * 36 - 1  # below a (6, 6) operand's, above a (2, 1, 3) one's
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", str(budget / 2**20))
    got, est = _run(case, "exact")
    assert {est.names[i] for i in est._persample.last_plan.generic} == {"We", "Wc", "bc"}
    assert _rel(got, _oracle(case, "exact")) <= DET_REL_F64
