"""The squared products a per-sample step leaves to the state (``fimfast.batch_sums.Sums.defer``).

A layer without weight sharing, and the logits layer in closed form, estimate their weight as one
product of squares, ``(G^2)^T (A^2)`` (docs/math.md §4). From the second step of a sum on, the
state adds it into its values by one ``addmm_`` (``Sums.fold_into``) instead of forming it and
adding it; the first step (or an exponential average) forms it. Checked against the float64
oracle (tests/oracle.py) over several batches, for weights stored both ways round and for a
weight filled by blocks, and with the squares over the memory budget (no product kept).
"""

from __future__ import annotations

import pytest
import torch
from cases import classifier_case
from oracle import oracle_flat, rel_error, row_jacobians
from tolerances import DET_REL_F64
from torch import nn

import fimfast
from fimfast import hooks
from fimfast.batch_sums import Sums
from fimfast.rules import Rule, UseKind, register_rule, trainable, unregister_rule
from fimfast.rules.base import Outer, Vec, patch_forward


class Split(nn.Module):
    """``y = [x W[:h]^T, x W[h:]^T] + b``: one weight in two blocks of rows, each through its own
    call of ``F.linear`` (a rule gives one use per block)."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.h = o // 2
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        top = nn.functional.linear(x, self.weight[: self.h])
        low = nn.functional.linear(x, self.weight[self.h :])
        return torch.cat([top, low], -1) + self.bias


class SplitRule(Rule):
    """The rule of :class:`Split`: its forward re-run with both halves tapped; the weight as two
    blocks of rows (two OUTER uses), the bias as one VEC use."""

    name = "split"

    def install(self, module, cap):
        return patch_forward(module, lambda x: self._forward(module, cap, x))

    def _forward(self, module, cap, x):
        h, w, b = module.h, module.weight, module.bias
        top = nn.functional.linear(x, w[:h])
        low = nn.functional.linear(x, w[h:])
        if cap.active and len(trainable(cap, w, b)) == 2:
            t0, top = cap.tap(top, lead=1, key=(id(module), 0))
            t1, low = cap.tap(low, lead=1, key=(id(module), 1))
            uses = [hooks.Use(w, UseKind.OUTER, block=(0, h)),
                    hooks.Use(w, UseKind.OUTER, block=(h, w.shape[0])),
                    hooks.Use(b, UseKind.VEC)]
            cap.record(hooks.Call(module, self, [t0, t1], uses, {"x": x.detach()}))
            cap.calls[-1].internal = {id(w): 2, id(b): 1}  # the weight: two slices, two edges
        return torch.cat([top, low], -1) + b

    def terms(self, call, grads):
        if any(g is None for g in grads):
            return [None] * len(call.uses)
        x = call.data["x"].unsqueeze(1)  # (N, T=1, I)
        return [Outer(grads[0].unsqueeze(2), x), Outer(grads[1].unsqueeze(2), x),
                Vec(torch.cat(grads, -1))]


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Split(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))


def _hf_net():
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(4, 7))  # (nf=out, nx=in)


def _batches(n_batches: int = 3):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(N, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (N,), generator=g)) for N in (6, 3, 8)[:n_batches]]


def _oracle(model, batches) -> dict[str, torch.Tensor]:
    """The float64 EMPIRICAL sum over ``batches``: the oracle of each batch, added."""
    total = None
    for b in batches:
        rj = row_jacobians(classifier_case(model, b, 4, "fold"))
        one = rj.split(oracle_flat(rj, "categorical", "empirical"))
        total = one if total is None else {k: total[k] + one[k] for k in total}
    return total


def _spy(monkeypatch) -> list[int]:
    """The number of kept products each commit folds (``Sums.fold_into``, or the extension's
    ``fold_lanes`` for the lanes of a prepared step: fimfast/persample/lanes.py)."""
    from fimfast.persample.lanes import Lanes

    folds: list[int] = []
    real, real_lanes = Sums.fold_into, Lanes.fold_into

    def fold_into(self, values):
        folds.append(sum(len(v) for v in self.products.values()))
        return real(self, values)

    def lanes_fold_into(self, values):
        n, before = len(folds), self.kept
        real_lanes(self, values)
        if len(folds) == n and before is not None:  # the extension folded the kept lanes
            folds.append(sum(w >= 0 for w in before[0][2]))

    monkeypatch.setattr(Sums, "fold_into", fold_into)
    monkeypatch.setattr(Lanes, "fold_into", lanes_fold_into)
    return folds


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "hf_conv1d":
        pytest.importorskip("transformers", reason="transformers is not installed")
        return _hf_net().double()
    if kind == "blocks":
        return SplitNet().double()
    return _mlp().double()


@pytest.fixture
def split_rule():
    register_rule(Split, SplitRule())
    yield
    unregister_rule(Split)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["mlp", "hf_conv1d", "blocks"])
def test_later_steps_fold_the_products_into_the_state(monkeypatch, split_rule, kind, reduction):
    model = _model(kind)
    batches = _batches()
    folds = _spy(monkeypatch)
    est = fimfast.DiagFisher(model, "empirical", reduction=reduction)
    for b in batches:
        est.step(b)
    assert not est._persample.last_plan.generic
    # the first step forms its products (adopted as the values), the later ones fold theirs:
    # one per weight without weight sharing (two blocks for Split's), the logits layer's included
    want_products = {"mlp": 3, "hf_conv1d": 2, "blocks": 3}[kind]
    assert folds == [want_products] * (len(batches) - 1)
    ref = _oracle(model, batches)
    if reduction == "mean":
        n = sum(b[0].shape[0] for b in batches)
        ref = {k: v / n for k, v in ref.items()}
    assert rel_error(dict(est.result()), ref) <= DET_REL_F64


@pytest.mark.parametrize("ema", [None, 0.8])
def test_monte_carlo_folds_as_the_generic_path_adds(monkeypatch, ema):
    """MONTE_CARLO with one and two draws (several columns: squares summed before the product)
    against the generic path with the same draws, with and without an exponential average (which
    forms its products: nothing is folded)."""
    model = _model("mlp")
    batches = _batches()
    for draws in (1, 2):
        folds = _spy(monkeypatch)
        fast = fimfast.DiagFisher(model, "monte_carlo", ema=ema, seed=5, num_probes=draws)
        ref = fimfast.DiagFisher(model, "monte_carlo", ema=ema, seed=5, num_probes=draws)
        ref._persample.use_rules = False
        for b in batches:
            fast.step(b)
            ref.step(b)
        assert folds == ([] if ema else [3, 3])
        assert rel_error(dict(fast.result()), dict(ref.result())) <= DET_REL_F64


def test_products_over_the_memory_budget_are_formed_in_the_step(monkeypatch):
    """Squares that would pass FIMFAST_MEMORY_BUDGET_MB are not kept: the step forms its
    products (the same estimate)."""
    model = _model("mlp")
    batches = _batches()
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.0001")  # ~100 bytes
    folds = _spy(monkeypatch)
    est = fimfast.DiagFisher(model, "empirical")
    for b in batches:
        est.step(b)
    assert folds == []
    assert rel_error(dict(est.result()), _oracle(model, batches)) <= DET_REL_F64


def test_sums_fold_and_form_by_hand():
    """``Sums`` with hand-made products: formed (an empty slot takes the product, a block adds
    into zeros) and folded (into existing values), against the same sums written out."""
    g = torch.Generator().manual_seed(0)
    G, A = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    S = torch.rand(4, 2, generator=g)
    shapes = [(3, 2), (2, 3), (4, 2)]
    ref = [G.square().t() @ A.square(), (A.square().t() @ G.square()),
           torch.cat([torch.zeros(2, 2), S.t() @ A.square()])]

    def sums():
        s = Sums(shapes, [torch.float32] * 3, [torch.device("cpu")] * 3)
        s.fold = True
        assert s.defer(0, G, A)
        assert s.defer(1, G, A, transposed=True)
        assert s.defer(2, S, A, block=(2, 4), squared=True)
        return s

    formed = sums().tensors()
    for got, want in zip(formed, ref):
        torch.testing.assert_close(got, want)
    values = [torch.ones(s) for s in shapes]
    sums().fold_into(values)
    for got, want in zip(values, ref):
        torch.testing.assert_close(got, want + 1)
    off = Sums(shapes, [torch.float32] * 3, [torch.device("cpu")] * 3)
    assert not off.defer(0, G, A)  # folding not allowed: nothing kept
    assert not off.products
