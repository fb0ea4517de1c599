"""Stacked experts, ``F.linear(x, W[e], b[e])`` on slices of a 3-D parameter
(fimfast/functional_stacked.py): a hand-written block of the pattern (top-1 / top-2, a stacked
bias, SwiGLU experts chunked from one ``gate_up``, a token LM with ignored labels) and a tiny
Hugging Face Mixtral (causal LM, sequence classifier), against the float64 oracle of every step
(tests/adversarial.py), the experts on the fast path; every other use of ``W`` stays exact."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from adversarial import max_rel, nonzero, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stacked_models import StackedClassifier, mixtral  # noqa: E402

F = torch.nn.functional
TYPES = ["exact", "empirical", "monte_carlo", "hutchinson"]
V, C, T, N = 11, 3, 6, 5


def _batches(lm: bool, n: int = 2, seed: int = 0, vocab: int = V, rows: int = N, T: int = T
             ) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (rows, T), generator=g)
        if lm:
            y = torch.randint(0, vocab, (rows, T), generator=g)
            y[0, :2] = -100  # ignored tokens
            y[rows - 2, T - 2] = -100
        else:
            y = torch.randint(0, C, (rows,), generator=g)
        out.append((ids, y))
    return out


MODELS = {
    "top1": dict(k=1),
    "top2_bias": dict(k=2, bias=True),
    "top2_swiglu_bias": dict(k=2, mlp=True, bias=True, E=4),
    "lm_top2_bias": dict(k=2, bias=True, lm=True),
}


def _model(name: str, seed: int = 1) -> StackedClassifier:
    torch.manual_seed(seed)
    kw = dict(MODELS[name])
    lm = kw.pop("lm", False)
    return StackedClassifier(V, C=V if lm else C, lm=lm, **kw).double()


def _generic(est) -> dict:
    plan = est._persample.last_plan
    names = [n for n, p in est.model.named_parameters() if p.requires_grad]
    return {names[i]: plan.reasons.get(i) for i in plan.generic}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_stacked_matches_oracle(name, fim_type):
    model = _model(name)
    est, ref = run(model, _batches(model.lm), fim_type, num_probes=2)
    assert nonzero(ref)  # every expert got rows: no vacuous comparison
    assert max_rel(est, ref) < 1e-10
    if fim_type != "hutchinson":
        assert _generic(est) == {}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_mixtral_matches_oracle(kind, fim_type):
    """Hugging Face's ``MixtralExperts`` (eager experts): gate_up_proj / down_proj slices on
    the tokens routed to each expert, the router ``F.linear`` on a bare parameter."""
    pytest.importorskip("transformers")
    model = mixtral(kind, V=7, C=C).double()
    est, ref = run(model, _batches(kind == "lm", n=1, vocab=7, rows=3, T=4), fim_type,
                   num_probes=2)
    experts = [n for n in ref if "experts" in n]
    assert len(experts) == 4 and all(float(ref[n].abs().max()) > 0 for n in experts)
    assert max_rel(est, ref) < 1e-6  # the router's softmax runs in float32 (Mixtral's .float())
    if fim_type != "hutchinson":
        assert _generic(est) == {}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduction(reduction):
    model = _model("lm_top2_bias")
    batches = _batches(True, n=2, seed=3)
    est, ref = run(model, batches, "exact", reduction=reduction)
    if reduction == "mean":
        rows = sum(int((b[1] != -100).sum()) for b in batches)
        ref = {n: v / rows for n, v in ref.items()}
    assert max_rel(est, ref) < 1e-10
    assert _generic(est) == {}


def _rel(est, ref: dict, skip: str = "") -> float:
    return max_rel(est, {n: v for n, v in ref.items() if n != skip})


@pytest.mark.parametrize("fim_type", ["exact", "monte_carlo"])
@pytest.mark.parametrize("k", [1, 2])
def test_empty_experts_and_one_expert_for_all(k, fim_type):
    """Step 0 sends every token to expert 0 (the others get no rows: exactly zero), step 1 lets
    the router choose, step 2 sends everything to expert 2: each structure exact. (Top-2 with
    both choices forced to one expert: the renormalised gates sum to one, the router's Fisher
    is zero up to rounding and left out of the comparison.)"""
    forced = {0: 0, 1: None, 2: 2}
    skip = "moe.router" if k == 2 else ""

    def model():
        torch.manual_seed(1)
        return StackedClassifier(V, C=C, k=k, bias=True).double()

    def before(i, m):
        m.moe.force = forced[i]

    est, ref = run(model(), _batches(False, n=1), fim_type, before=before)
    got = dict(est.result().items())
    for n in ("moe.w", "moe.b"):
        assert float(ref[n][0].abs().max()) > 0
        assert float(ref[n][1:].abs().max()) == 0 and float(got[n][1:].abs().max()) == 0
    assert _rel(est, ref, skip) < 1e-10
    est, ref = run(model(), _batches(False, n=3, seed=4), fim_type, before=before)
    assert nonzero({n: v for n, v in ref.items() if n != skip})
    assert _rel(est, ref, skip) < 1e-10
    assert _generic(est) == {}


def test_slice_used_twice():
    """``F.linear(x, W[e], b[e]) + F.linear(x, W[e], b[e])``: one slice's two uses add before
    the square (a tied weight), on the fast path."""
    model = _model("top2_bias")
    model.moe.twice = True
    for fim_type in ("exact", "empirical"):
        est, ref = run(model, _batches(False), fim_type)
        assert nonzero(ref)
        assert max_rel(est, ref) < 1e-10
        assert _generic(est) == {}


class _Extra(StackedClassifier):
    """A stacked block plus another use of ``W`` added to the logits."""

    def __init__(self, extra: str):
        torch.manual_seed(2)
        super().__init__(V, C=C, k=2, bias=True)
        self.extra = extra

    def forward(self, ids):
        z = super().forward(ids)
        w, h = self.moe.w, self.emb(ids).mean(1)
        if self.extra == "sum":  # W.sum(): no batch at all
            return z + 0.1 * w.sum()
        if self.extra == "slice_sum":  # the model's slice used by something else too
            s = w[1]
            return z + 0.1 * s.sum() + 0 * F.linear(h, s)[:, :C]
        if self.extra == "sub_slice":  # W[e, :k]
            return z + F.linear(h, w[0, :C])
        if self.extra == "column":  # W[:, 0]: (E, I)
            return z + F.linear(h, w[:, 0])[:, :C]
        if self.extra == "whole":  # W used whole by a recognised call (einsum)
            return z + torch.einsum("nd,eod->no", h, w)[:, :C]
        if self.extra == "linear_2d":  # F.linear(h, W[e]) on the batch itself, a second slice
            return z + F.linear(h, w[2])[:, :C]
        raise ValueError(self.extra)


@pytest.mark.parametrize("extra", ["sum", "slice_sum", "sub_slice", "column", "whole"])
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_other_uses_of_the_stacked_weight_stay_exact(extra, fim_type):
    """Every other use of ``W`` (whole, a slice used elsewhere, a sub-slice, a column) sends it
    to the generic path, exactly; the other parameters keep their rules."""
    model = _Extra(extra).double()
    est, ref = run(model, _batches(False), fim_type)
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    assert "moe.w" in _generic(est)
    assert "moe.b" not in _generic(est)


def test_slice_on_batch_rows():
    """``F.linear(h, W[e])`` on the batch's own rows, besides the routed slices: fast, exact."""
    model = _Extra("linear_2d").double()
    est, ref = run(model, _batches(False), "exact")
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
    assert _generic(est) == {}
