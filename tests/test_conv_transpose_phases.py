"""Transposed convolutions by phases (fimfast/rules/conv.py) and the squares of Outer terms placed
by index (fimfast/persample/squares.py), against per-unit gradients from autograd in float64.

The rule has two forms, chosen per chunk by :func:`fimfast.rules.conv._unfold_cheaper`: the
phases (one ``Outer`` per residue of the stride, the output gradient as a view or a copy of one
phase) and the unfolded output gradient (one ``Outer`` for the whole weight). Both are forced here
on every configuration, directly on the rule's terms and through the estimator (float64 oracle).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle
from test_layers import ConvHead, _rand, _rel, _simple, run
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast.batch_sums import Sums
from fimfast.hooks import Call, Use
from fimfast.persample import squares
from fimfast.persample.plan import Group, GroupKind
from fimfast.rules import ConvTransposeRule, Outer
from fimfast.rules import conv as convmod
from fimfast.rules.base import UseKind

# (kind, in, out, kernel, stride, padding, dilation, groups, output padding, input size)
CONFIGS = {
    "1d_k4_s2_p1": (nn.ConvTranspose1d, 3, 4, 4, 2, 1, 1, 1, 0, (6,)),
    "1d_k5_s3_p2_d2_op1_g2": (nn.ConvTranspose1d, 4, 2, 5, 3, 2, 2, 2, 1, (4,)),
    "1d_k1_s2": (nn.ConvTranspose1d, 2, 3, 1, 2, 0, 1, 1, 1, (5,)),
    "1d_k2_s3_short": (nn.ConvTranspose1d, 2, 2, 2, 3, 0, 1, 1, 0, (1,)),
    "2d_k3_s1_p1_g2": (nn.ConvTranspose2d, 4, 6, 3, 1, 1, 1, 2, 0, (4, 3)),
    "2d_k4_s2_p1_g2": (nn.ConvTranspose2d, 4, 2, 4, 2, 1, 1, 2, 0, (3, 2)),
    "2d_k42_s2_p1_op": (nn.ConvTranspose2d, 2, 3, (4, 2), 2, (1, 0), 1, 1, (1, 0), (3, 2)),
    "2d_k32_s23_d12": (nn.ConvTranspose2d, 3, 2, (3, 2), (2, 3), (1, 0), (1, 2), 1, (0, 2),
                       (3, 4)),
    "2d_k3_s2_d3_p2": (nn.ConvTranspose2d, 2, 3, 3, 2, 2, 3, 1, 1, (4, 4)),
    "3d_k2_s2_g2": (nn.ConvTranspose3d, 2, 4, 2, 2, 0, 1, 2, 0, (2, 3, 2)),
    "3d_k3_s122_p1": (nn.ConvTranspose3d, 2, 2, 3, (1, 2, 2), 1, 1, 1, (0, 1, 0), (2, 2, 3)),
}
NAMES = list(CONFIGS)


def _module(name: str) -> tuple[nn.Module, torch.Tensor]:
    kind, I, O, K, s, p, d, g, op, size = CONFIGS[name]
    torch.manual_seed(0)
    m = kind(I, O, K, stride=s, padding=p, dilation=d, groups=g, output_padding=op).double()
    return m, _rand(3, I, *size).double()


@pytest.fixture(params=["phases", "unfolded"])
def form(request, monkeypatch):
    """Force one form of the rule."""
    monkeypatch.setattr(convmod, "_unfold_cheaper", lambda *a: request.param == "unfolded")
    return request.param


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_indices_cover_the_weight_once(name):
    """The phases' indices, and the unfolded form's, are each a permutation of the weight."""
    m, _ = _module(name)
    every = torch.arange(m.weight.numel())
    phases = convmod._phases(m, m.weight.device)
    assert torch.equal(torch.cat([ph.index for ph in phases]).sort().values, every)
    assert torch.equal(convmod._unfolded_index(m, m.weight.device).sort().values, every)


def _per_unit(m: nn.Module, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``(M, N, numel)``: the weight gradient of ``<G[m, n], m(x[n])>`` for every unit."""
    out = torch.zeros(G.shape[0], x.shape[0], m.weight.numel(), dtype=torch.float64)
    for n in range(x.shape[0]):
        y = m(x[n : n + 1])
        for k in range(G.shape[0]):
            (gw,) = torch.autograd.grad(y, m.weight, G[k, n : n + 1], retain_graph=True)
            out[k, n] = gw.reshape(-1)
    return out


def _square(call: Call, terms: list, sums: Sums, index: int = 0) -> None:
    """The engine's squares of the weight's terms of ``call`` (one group, every weight use)."""
    members = [(call, ui) for ui, u in enumerate(call.uses) if u.kind == UseKind.OUTER]
    parts = [terms[ui] for _, ui in members if terms[ui] is not None]
    squares.accumulate(Group(index, None, GroupKind.OUTER, members), parts, sums, None, {})


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_terms_square_to_per_unit_gradients(name, M, form):
    m, x = _module(name)
    rule = ConvTransposeRule()
    phases = convmod._phases(m, m.weight.device)
    uses = [Use(m.weight, UseKind.OUTER, groups=m.groups) for _ in phases]
    uses.append(Use(m.bias, UseKind.VEC))
    call = Call(m, rule, [], uses, {"x": x})
    out_shape = m(x).shape
    G = torch.randn(M, *out_shape, dtype=torch.float64)
    terms = rule.terms(call, [G])
    per = _per_unit(m, x, G)
    sums = Sums([m.weight.shape], [torch.float64], [m.weight.device])
    _square(call, terms, sums)
    got = sums.tensors()[0].reshape(-1)
    ref = per.square().sum((0, 1))
    assert float((got - ref).norm() / ref.norm()) <= 1e-12
    # the bias: the output gradient summed over positions
    V = terms[-1].V
    assert torch.allclose(V, G.flatten(3).sum(-1), rtol=1e-12, atol=0)
    assert len(terms) == len(phases) + 1
    weight = [t for t in terms[:-1] if t is not None]
    if form == "unfolded":
        assert len(weight) == 1 and weight[0].P.shape[2] == x[0, 0].numel()
    elif _uniform(m, out_shape[2:]) and len(phases) > 1:  # the phases side by side, as groups
        assert len(weight) == 1 and weight[0].P.dim() == 5
        assert weight[0].P.shape[3] == len(phases) * m.groups
    else:
        assert len(weight) == len(phases)


def _uniform(m: nn.Module, out_size) -> bool:
    """Every phase has as many taps and output positions (dilation 1 here): kernel and output
    multiples of the stride."""
    return all(
        d == 1 and K % s == 0 and L % s == 0
        for K, s, d, L in zip(m.kernel_size, m.stride, m.dilation, out_size)
    )


@pytest.mark.parametrize("name", ["convT1d_groups_outpad", "convT2d_stride_dilation",
                                  "convT2d_outpad_by_dilation", "convT3d_groups_nobias",
                                  "decoder_with_norms"])
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_estimator_matches_oracle_both_forms(name, fim_type, form):
    from test_layers_conv_bag import build

    case = build(name)
    ref = oracle(case, fim_type)
    got, est = run(case.to(torch.float64), fim_type)
    assert _rel(got, ref) <= DET_REL_F64
    assert not est._persample.last_plan.generic, est._persample.last_plan.reasons


def test_form_counts_every_chunk_of_the_step():
    """The phases' input windows are formed once per step, the unfolded output gradient once per
    chunk: the choice weighs the step's chunks. ConvTranspose2d(16, 8, 4, stride 2, padding 1)
    on 14 x 14 inputs, chunks of 2 columns: unfolded in a one-chunk step (``2 * 8 * 16 * 196 <
    16 * 16 * 196 + 2 * 8 * 784``), by phases in a step of 5 chunks (9 EXACT columns)."""
    m = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
    assert convmod._unfold_cheaper(m, 2, 1, (14, 14), (28, 28))
    assert not convmod._unfold_cheaper(m, 2, 5, (14, 14), (28, 28))
    assert not convmod._unfold_cheaper(m, 9, 1, (14, 14), (28, 28))
    # stride 1: no copy of the output gradient, the windows against the chunks' unfoldings
    m1 = nn.ConvTranspose2d(8, 4, 3, padding=1, groups=2)
    assert convmod._unfold_cheaper(m1, 1, 1, (28, 28), (28, 28))
    assert not convmod._unfold_cheaper(m1, 1, 9, (28, 28), (28, 28))


@pytest.mark.parametrize("name", ["convT1d_groups_outpad", "convT2d_stride_dilation",
                                  "convT3d_groups_nobias", "decoder_with_norms"])
def test_estimator_matches_oracle_over_chunks(name, monkeypatch):
    """EXACT one column per chunk, each layer's form chosen by the rule for the step's chunks,
    against the float64 oracle."""
    from test_layers_conv_bag import build

    seen = []
    choose = convmod._unfold_cheaper

    def spy(*a):
        seen.append(choose(*a))
        return seen[-1]

    monkeypatch.setattr(convmod, "_unfold_cheaper", spy)
    case = build(name)
    ref = oracle(case, "exact")
    got, est = run(case.to(torch.float64), "exact", class_chunk=1)
    assert _rel(got, ref) <= DET_REL_F64
    assert not est._persample.last_plan.generic, est._persample.last_plan.reasons
    assert seen and all(c.chunks > 1 for c in est._persample.last_plan.calls)


class Twice(nn.Module):
    """One transposed convolution called on two inputs: its uses add before the square."""

    def __init__(self):
        super().__init__()
        self.ct = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, groups=1)

    def forward(self, x):
        return torch.cat([self.ct(x), self.ct(torch.tanh(x))], 1)


def test_reused_transposed_conv_matches_oracle(form, monkeypatch):
    monkeypatch.setattr(squares, "_indexed_dense", _no_dense)
    x = _rand(3, 3, 3, 4)
    case = _simple("convT_twice", ConvHead(Twice(), x, 3), x, 3)
    for fim_type in ("exact", "empirical"):
        ref = oracle(case, fim_type)
        got, est = run(case.to(torch.float64), fim_type)
        assert _rel(got, ref) <= DET_REL_F64, fim_type
        assert not est._persample.last_plan.generic


# --------------------------------------------------------------------------------------------- #
# squares of Outer terms placed by index
# --------------------------------------------------------------------------------------------- #
def _outer(M, N, T, O, I, index, seed):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(M, N, T, O, generator=g, dtype=torch.float64)
    Q = torch.randn(N, T, I, generator=g, dtype=torch.float64)
    return Outer(P, Q, index)


def _reference(terms: list[Outer], numel: int) -> torch.Tensor:
    """Per-unit gradients placed in the parameter, added over the terms, squared, summed."""
    full = None
    for t in terms:
        per = torch.einsum("mnto,nti->mnoi", t.P, t.Q).flatten(2)
        ix = torch.arange(numel) if t.index is None else t.index
        if full is None:
            full = torch.zeros(per.shape[0], per.shape[1], numel, dtype=torch.float64)
        full[:, :, ix] += per
    return full.square().sum((0, 1))


def _indexed_sq(terms: list[Outer], numel: int) -> torch.Tensor:
    w = torch.zeros(numel, dtype=torch.float64)
    sums = Sums([w.shape], [torch.float64], [w.device])
    calls = [Call(nn.Identity(), None, [], [Use(w, UseKind.OUTER)]) for _ in terms]
    squares.accumulate(Group(0, None, GroupKind.OUTER, [(c, 0) for c in calls]), terms, sums,
                       None, {})
    return sums.tensors()[0]


def _no_dense(*args):
    raise AssertionError("per-unit gradients formed where the indices are disjoint or equal")


def test_indexed_disjoint_terms_square_apart(monkeypatch):
    monkeypatch.setattr(squares, "_indexed_dense", _no_dense)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    terms = [_outer(2, 3, 5, 3, 4, perm[:12], 0), _outer(2, 3, 4, 2, 6, perm[12:], 1)]
    assert torch.allclose(_indexed_sq(terms, 24), _reference(terms, 24), rtol=1e-12)


def test_indexed_equal_terms_add_before_the_square(monkeypatch):
    monkeypatch.setattr(squares, "_indexed_dense", _no_dense)
    ix = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    terms = [_outer(2, 3, 5, 3, 4, ix, 0), _outer(2, 3, 2, 3, 4, ix.clone(), 1)]
    assert torch.allclose(_indexed_sq(terms, 12), _reference(terms, 12), rtol=1e-12)


def test_indexed_overlapping_terms_use_the_per_unit_gradients():
    """Partly overlapping indices, and a term laid out as the parameter (no index)."""
    a = torch.arange(0, 12)
    b = torch.arange(6, 18).flip(0)
    terms = [_outer(2, 3, 5, 3, 4, a, 0), _outer(2, 3, 2, 4, 3, b, 1),
             _outer(2, 3, 3, 6, 3, None, 2)]
    assert torch.allclose(_indexed_sq(terms, 18), _reference(terms, 18), rtol=1e-12)


def test_outer_index_is_checked():
    m, x = _module("2d_k3_s1_p1_g2")

    class Bad(ConvTransposeRule):
        def terms(self, call, grads):
            out = super().terms(call, grads)
            t = out[0]
            out[0] = Outer(t.P, t.Q, t.index[:-1])  # one position short
            return out

    phases = convmod._phases(m, m.weight.device)
    uses = [Use(m.weight, UseKind.OUTER, groups=2) for _ in phases] + [Use(m.bias, UseKind.VEC)]
    call = Call(m, Bad(), [], uses, {"x": x})
    G = torch.randn(2, *m(x).shape, dtype=torch.float64)
    with pytest.raises(TypeError, match="does not fit"):
        call.rule.terms(call, [G])


def test_outer_index_bounds_read_again_when_modified():
    """An index's bounds are read once per version of the tensor: the same index, modified in
    place after a first check, is checked again (fimfast/rules/base.py, ``_index_bounds``)."""
    from fimfast.rules.base import _fits

    m, x = _module("2d_k3_s1_p1_g2")
    ix = convmod._unfolded_index(m, m.weight.device).clone()
    P = torch.zeros(1, 3, 4, 2, ix.numel() // (2 * 2))  # (M, N, T, g, O/g kk) by I/g = 2
    Q = torch.zeros(3, 4, 2, 2)
    u = Use(m.weight, UseKind.OUTER, groups=2)
    assert _fits(Outer(P, Q, ix), u)
    assert _fits(Outer(P, Q, ix), u)  # the bounds kept
    ix[3] = m.weight.numel()  # one past the weight
    assert not _fits(Outer(P, Q, ix), u)
    ix[3] = -1
    assert not _fits(Outer(P, Q, ix), u)
    ix[3] = 0
    assert _fits(Outer(P, Q, ix), u)
    with torch.inference_mode():  # no version counter: read at every check
        ixi = ix.clone()
    assert _fits(Outer(P, Q, ixi), u)
    with torch.inference_mode():
        ixi[3] = m.weight.numel()
    assert not _fits(Outer(P, Q, ixi), u)


def _empirical(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 reference: ``sum_n (grad log p(y_n | x_n))^2`` by one backward per sample."""
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for n in range(x.shape[0]):
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        for (k, _), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(
                model.parameters()))):
            out[k] += g.square()
    return out


def test_uses_follow_the_layer_settings_between_steps(form):
    """The uses a call declares (one per phase) are kept across steps while the layer's weight,
    bias and settings are the same objects: a layer whose stride changes between two steps of
    one estimator (2 phases, then 3) is declared anew, and both steps match the reference."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose1d(4, 4, 4, stride=2, padding=1)
    model = nn.Sequential(ct, nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    est = fimfast.DiagFisher(model, "empirical")
    for stride in (2, 3):
        ct.stride = (stride,)
        est.reset()
        est.step((x, y))
        ref = _empirical(model, x, y)
        for k, v in est.result().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-14)
        assert not est._persample.last_plan.generic, est._persample.last_plan.reasons
