"""Weights computed from parameters, ``W = f(theta)``, used by layers with a rule: the per-sample
gradients of ``W`` the rules give are pulled back through ``f`` (fimfast/derived_weights.py,
fimfast/pullback.py; docs/math.md §4): ``torch.nn.utils.parametrize`` (weight_norm with
``dim=0`` and ``dim=None``, spectral_norm in train and eval mode, orthogonal, a symmetric
parametrization of one's own, one with two originals), the older ``torch.nn.utils.weight_norm``
hook, on ``nn.Linear`` (the logits layer too), ``nn.Conv2d`` (grouped too) and ``nn.Embedding``,
against the float64 brute-force oracle (tests/oracle.py). A parameter also used another way
takes the generic path, exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from cases import Case, check_fast_twice, check_monte_carlo_same_seed, run_case
from oracle import oracle_flat, rel_error, row_jacobians, strip_pruned
from tolerances import DET_REL_F64
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

N, D, C = 6, 5, 4


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


class LowRank(nn.Module):
    """``W = A @ B``: a parametrization with two originals."""

    def forward(self, A, B):
        return A @ B

    def right_inverse(self, W):
        return W.clone(), torch.eye(W.shape[1], dtype=W.dtype)


class Scaled(nn.Module):
    def forward(self, X):
        return 0.5 * torch.tanh(X) + X * X.mean()


def _mlp(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "weight_norm":  # dim=0, dim=None (no bias), the older hook on the logits layer
        return nn.Sequential(P.weight_norm(nn.Linear(D, D)), nn.Tanh(),
                             P.weight_norm(nn.Linear(D, D, bias=False), dim=None), nn.Tanh(),
                             torch.nn.utils.weight_norm(nn.Linear(D, C)))
    if kind == "old_weight_norm":
        return nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(D, D), dim=None), nn.Tanh(),
                             torch.nn.utils.weight_norm(nn.Linear(D, C), dim=1))
    if kind in ("spectral_train", "spectral_eval"):
        net = nn.Sequential(P.spectral_norm(nn.Linear(D, D)), nn.Tanh(),
                            P.spectral_norm(nn.Linear(D, C), n_power_iterations=2))
        return net.train(kind == "spectral_train")
    if kind == "orthogonal":
        return nn.Sequential(P.orthogonal(nn.Linear(D, D)), nn.Tanh(),
                             P.orthogonal(nn.Linear(D, D), orthogonal_map="cayley"), nn.Tanh(),
                             nn.Linear(D, C))
    if kind == "custom":  # a symmetric weight, two originals, a nonlinear map
        net = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh(),
                            nn.Linear(D, C))
        parametrize.register_parametrization(net[0], "weight", Symmetric())
        parametrize.register_parametrization(net[2], "weight", LowRank())
        parametrize.register_parametrization(net[4], "weight", Scaled())
        parametrize.register_parametrization(net[4], "bias", Scaled())
        return net
    raise ValueError(kind)


class ConvEmb(nn.Module):
    """A parametrized table (a bag of token vectors), a weight-normed and a grouped symmetric
    convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = P.weight_norm(nn.Embedding(7, 4))
        self.conv = P.weight_norm(nn.Conv2d(1, 4, 3, padding=1))
        self.gconv = nn.Conv2d(4, 4, 2, groups=2)
        parametrize.register_parametrization(self.gconv, "weight", Scaled())
        self.head = nn.Linear(4 + 4 * 4, C)

    def forward(self, x):
        ids, img = x[:, :3].long(), x[:, 3:].view(-1, 1, 3, 3)
        e = self.emb(ids).sum(1)
        c = torch.tanh(self.gconv(torch.tanh(self.conv(img)))).flatten(1)
        return self.head(torch.cat([e, c], 1))


class Shared(nn.Module):
    """``theta`` used through its parametrization and directly (``kind`` ``direct``), or one
    parametrized module called twice (``twice``)."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc = P.weight_norm(nn.Linear(D, D))
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.kind == "twice":
            h = torch.tanh(self.fc(h))
        else:
            h = h + F.linear(h, self.fc.parametrizations.weight.original1)
        return self.head(h)


class RelPosAttention(nn.Module):
    """Self-attention over a 2 x 2 grid of tokens with a relative-position bias table gathered
    by an index buffer (Swin, BEiT): ``table[index.view(-1)].view(T, T, H).permute(2, 0, 1)``
    added to the scores of every sample. ``windows``: the grid of each sample split into
    windows of one row, folded into the batch (Swin's window attention)."""

    def __init__(self, windows: bool = False, d: int = 6, H: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.windows, self.H = windows, H
        self.embed = nn.Linear(D, 4 * d)
        self.qkv, self.proj, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, C)
        self.table = nn.Parameter(0.5 * torch.randn(9, H))
        yy, xx = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()])  # (2, T)
        rel = (pos[:, :, None] - pos[:, None, :]) + 1  # (2, T, T) in [0, 2]
        self.register_buffer("index", rel[0] * 3 + rel[1])

    def forward(self, x):
        N = x.shape[0]
        h = torch.tanh(self.embed(x)).view(N, 4, -1)  # (N, T, d)
        T = 4
        if self.windows:
            h = h.reshape(N * 2, 2, -1)
        B, L, d = h.shape
        q, k, v = self.qkv(h).view(B, L, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1) * (d // self.H) ** -0.5  # (B, H, L, L)
        bias = self.table[self.index.view(-1)].view(T, T, self.H).permute(2, 0, 1).contiguous()
        if self.windows:
            bias = bias[:, :L, :L]
        attn = attn + bias.unsqueeze(0)
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
        o = self.proj(o).reshape(N, T, d)
        return self.head(o.mean(1))


class FunctionalParam(nn.Module):
    """A module without a rule whose own parameter is parametrized, used by ``F.linear``."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.W, self.b = nn.Parameter(0.5 * torch.randn(D, D)), nn.Parameter(torch.randn(D))
        if kind == "functional_weight_norm":
            P.weight_norm(self, "W")
        else:
            parametrize.register_parametrization(self, "W", Symmetric())
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.W, self.b)))


def _case(kind: str) -> Case:
    g = torch.Generator().manual_seed(100)
    if kind.startswith("functional"):
        model = FunctionalParam(kind)
        x = torch.randn(N, D, generator=g)
    elif kind in ("relpos", "relpos_windows"):
        model = RelPosAttention(kind == "relpos_windows")
        x = torch.randn(N, D, generator=g)
    elif kind == "conv_emb":
        model = ConvEmb()
        x = torch.randn(N, 3 + 9, generator=g)
        x[:, :3] = torch.randint(0, 7, (N, 3), generator=g).float()
    else:
        model = Shared(kind) if kind in ("direct", "twice") else _mlp(kind)
        x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return Case(kind, strip_pruned(model), (x, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", C).to(torch.float64)


def _oracle(case: Case, quantity: str) -> dict[str, torch.Tensor]:
    rj = row_jacobians(strip_case(case))
    return rj.split(oracle_flat(rj, case.likelihood, quantity))


def strip_case(case: Case) -> Case:
    strip_pruned(case.model)
    return case


KINDS = ["weight_norm", "old_weight_norm", "spectral_eval", "spectral_train", "orthogonal",
         "custom", "conv_emb", "twice", "relpos", "functional_symmetric",
         "functional_weight_norm"]


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("kind", KINDS)
def test_computed_weights_match_oracle_on_the_fast_path(kind, quantity):
    case = _case(kind)
    est = check_fast_twice(case, quantity, _oracle(case, quantity), DET_REL_F64)
    assert est._persample.last_plan.pullbacks


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_train", "custom", "conv_emb",
                                  "relpos"])
def test_computed_weights_monte_carlo_same_seed(kind):
    case = _case(kind)
    est = check_monte_carlo_same_seed(strip_case(case), row_jacobians(strip_case(case)),
                                      DET_REL_F64)
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_a_parameter_also_used_directly_takes_the_generic_path(quantity):
    case = _case("direct")
    got, est = run_case(case, quantity)
    plan = est._persample.last_plan
    generic = {est.names[i]: plan.reasons[i] for i in plan.generic}
    assert set(generic) == {"fc.parametrizations.weight.original1"}
    assert "another path" in generic["fc.parametrizations.weight.original1"]
    assert plan.pullbacks  # original0 (the norms) still through the pullback
    assert rel_error(got, _oracle(case, quantity)) <= DET_REL_F64


def test_weight_norm_closed_form_equals_the_batched_pullback():
    """The closed form of ``torch._weight_norm``'s pullback against autograd's, ``dim`` 0, 1 and
    the whole tensor."""
    from fimfast import pullback_closed

    g = torch.Generator().manual_seed(3)
    for dim, gshape in ((0, (4, 1, 1)), (1, (1, 3, 1)), (-1, ())):
        v = torch.randn(4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
        gg = torch.rand(gshape, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
        W = torch._weight_norm(v, gg, dim)
        Dg = torch.randn(5, *W.shape, generator=g, dtype=torch.float64)
        want = torch.autograd.grad(W, [v, gg], Dg, retain_graph=True, is_grads_batched=True)
        got = pullback_closed.dense(W, Dg, [v, gg])
        if type(W.grad_fn).__name__ != "WeightNormInterfaceBackward0":
            assert got is None
            continue
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_budget_too_small_for_one_sample_sends_to_generic(monkeypatch):
    """A pullback that forms per-sample gradients of ``W`` (``orthogonal``) and one sample's do
    not fit the budget: the generic path; the closed forms (weight_norm, spectral_norm on
    ``nn.Linear``) form none and stay."""
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.0001")
    for kind, pulled in (("orthogonal", False), ("twice", True), ("spectral_eval", True)):
        case = _case(kind)
        got, est = run_case(case, "empirical")
        plan = est._persample.last_plan
        names = [n for n in est.names if "parametrizations" in n or "weight_" in n]
        if pulled:
            assert not plan.generic and plan.pullbacks
        else:
            assert {est.names[i] for i in plan.generic} >= set(names) and not plan.pullbacks
            assert all("memory budget" in plan.reasons[est.names.index(n)] for n in names)
        assert rel_error(got, _oracle(case, "empirical")) <= DET_REL_F64


def test_hutchinson_runs_on_parametrized_models():
    """One backward per probe needs nothing of the capture: the estimate is the HUTCHINSON one
    of the same model written without parametrizations (the same logits, the same probes)."""
    import fimfast

    case = _case("weight_norm")
    x, y = case.batch
    est = fimfast.DiagFisher(case.model, "hutchinson", seed=3, num_probes=4)
    est.step((x, y))
    got = dict(est.result().items())
    assert set(got) == {n for n, p in case.model.named_parameters()}
    assert all(torch.isfinite(t).all() for t in got.values())
    assert float(sum(t.sum() for t in got.values())) > 0


@pytest.mark.parametrize("representation", ["quasi_diag", "kfac", "ekfac"])
def test_structured_per_layer_factors_refuse_a_parametrized_module(representation):
    import fimfast

    case = _case("weight_norm")
    with pytest.raises(ValueError, match="weight made from other"):
        fimfast.fisher(case.model, [case.batch], "exact", representation=representation)


def test_the_failing_step_leaves_the_state_unchanged(monkeypatch):
    """An error inside the pullback leaves the accumulated state as it was."""
    from fimfast import pullback

    case = _case("weight_norm")
    got, est = run_case(case, "exact")
    before = {k: v.clone() for k, v in est.result().items()}

    def boom(*a, **k):
        raise RuntimeError("planted")

    monkeypatch.setattr(pullback, "_pull", boom)
    with pytest.raises(RuntimeError, match="planted"):
        est.step(case.batch)
    after = dict(est.result().items())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_labels_with_two_steps_second_plan_reused():
    """The second step binds the first step's plan (same structure: slots are kept)."""
    case = _case("custom")
    _, est = run_case(case, "exact")
    plans = dict(est._persample._plans)
    est.step(case.batch)
    assert est._persample._plans.keys() == plans.keys()
    rj = row_jacobians(strip_case(case))
    ref = rj.split(oracle_flat(dataclasses.replace(rj), case.likelihood, "exact"))
    assert rel_error({k: v / 2 for k, v in est.result().items()}, ref) <= DET_REL_F64


def test_float32_weight_norm_closed_form_within_float32_rounding():
    """The closed form of a weight-normed layer expands a square (docs/math.md §4): in float32,
    against the float64 oracle, it stays within the float32 tolerance of the other paths, also
    with inputs close to the direction of a row of ``v`` (where the expansion cancels most)."""
    from tolerances import DET_REL_F32

    case = _case("weight_norm")
    f32 = case.to(torch.float32)
    x = f32.batch[0]
    x[:3] = 3.0 * f32.model[0].parametrizations.weight.original1.detach()[:3]
    f32 = dataclasses.replace(f32, batch=(x, f32.batch[1]))
    for quantity in ("exact", "empirical"):
        got, est = run_case(f32, quantity)
        assert est._persample.last_plan.pullbacks and not est._persample.last_plan.generic
        assert rel_error(got, _oracle(f32, quantity)) <= DET_REL_F32


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_a_bias_table_on_windows_folded_into_the_batch_stays_exact(quantity):
    """Window attention with the windows folded into the batch: the table's path is exact,
    whichever path takes it."""
    case = _case("relpos_windows")
    got, _ = run_case(case, quantity)
    assert rel_error(got, _oracle(case, quantity)) <= DET_REL_F64


def test_batched_and_looped_pullbacks_agree():
    """The two ways of pulling back through a general ``f`` (one batched backward, one backward
    per unit; fimfast/pullback.py picks the faster) give the same gradients, and the choice is
    remembered per structure."""
    from fimfast import pullback

    g = torch.Generator().manual_seed(5)
    X = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 9, (3, 3), generator=g)
    for outs, thetas in (([Symmetric()(X)], [X]),
                         ([table[index.view(-1)].view(3, 3, 2).permute(2, 0, 1)], [table])):
        D = [torch.randn(7, *outs[0].shape, generator=g, dtype=torch.float64)]
        a, b = pullback._batched(outs, thetas, D), pullback._looped(outs, thetas, D)
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        pullback._WAYS.clear()
        got = pullback._pull({0: outs[0]}, {0: D[0]}, thetas)
        torch.testing.assert_close(got[0], b[0], rtol=1e-12, atol=1e-12)
        assert list(pullback._WAYS.values()) in (["batched"], ["loop"])


class Gated(nn.Module):
    """A gate computed from the batch's input (no gradient) by layers with rules, ``h * gate``
    (squeeze-and-excitation), next to a functional use of a bare parameter (the functional mode
    stays on)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.g1, self.g2 = nn.Linear(D, 8), nn.Linear(D, 3), nn.Linear(3, 4)
        self.head, self.p = nn.Linear(8, C), nn.Parameter(torch.randn(4))

    def forward(self, x):
        gate = torch.sigmoid(self.g2(torch.relu(self.g1(x)))).unsqueeze(1)  # (N, 1, 4)
        h = torch.tanh(self.fc(x)).view(-1, 2, 4) * gate
        return self.head((h * self.p).flatten(1))


def test_a_gate_computed_from_the_batch_is_left_to_the_rules():
    """Once outputs are tapped directly (from the second step), the gate's graph reaches only
    parameters; it has the batch's size along the batch dim, so it is no computed weight: its
    layers keep their rules."""
    g = torch.Generator().manual_seed(100)
    x, y = torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)
    case = Case("gated", Gated(), (x, y), lambda m, b: m(b[0]), torch.ones(N, dtype=torch.bool),
                y, "categorical", C).to(torch.float64)
    ref = _oracle(case, "exact")
    _, est = run_case(case, "exact")
    for _ in range(2):
        est.step(case.batch)
    plan = est._persample.last_plan
    assert not plan.generic and not plan.pullbacks, plan.reasons
    assert rel_error({k: v / 3 for k, v in est.result().items()}, ref) <= DET_REL_F64


def test_a_bias_table_stays_on_the_pullback_once_taps_are_direct():
    """From the third step on the layer outputs are tapped directly and the scores' graph too
    reaches parameters only: the table is still told apart by sizes (fimfast/functional_computed.py)
    and keeps its pullback, exactly."""
    case = _case("relpos")
    ref = _oracle(case, "exact")
    _, est = run_case(case, "exact")
    for _ in range(3):
        est.step(case.batch)
        plan = est._persample.last_plan
        assert not plan.generic and plan.pullbacks, plan.reasons
    assert rel_error({k: v / 4 for k, v in est.result().items()}, ref) <= DET_REL_F64
