"""The step guard of a model with buffers as one object (fimfast.guard.StepKept with a
BufferGuard) against the three nested guards it replaces (fimfast.guard._all_kept): the same
results, counts, buffers, warnings and errors, bit for bit, through BatchNorm in eval and train
mode, a forward that writes a buffer in place, one that replaces a buffer, one that writes a
parameter in place (refused), one that does so and then fails; and the prepared HUTCHINSON step
(fimfast/prepared.py) of models with buffers against the general path."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import assert_same_estimators
from torch import nn

import fimfast
from fimfast import guard, prepared


def _old_step_kept(buffers, walk, model, names, params):
    mods, tables = walk.of(model, params)
    if tables or buffers.has_buffers(model):
        return guard._all_kept(buffers, model, tables, names, params, mods)
    return guard.StepKept(names, params, mods)


class _Counting(nn.Module):
    """A forward that writes its buffer in place (``how="inplace"``; from its second call on:
    ``"late"``, with no copy to put back), replaces it (``"replace"``), writes a parameter in
    place (``"param"``), or writes one and fails (``"param_fail"``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin, self.head = nn.Linear(6, 8), nn.Linear(8, 4)
        self.register_buffer("seen", torch.zeros(8))
        self.calls = 0

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.calls += 1
        if self.how == "inplace" or (self.how == "late" and self.calls > 1):
            self.seen.add_(h.detach().mean(0))
        elif self.how == "replace":
            self.seen = self.seen + 1
        elif self.how.startswith("param"):
            with torch.no_grad():
                self.head.bias.add_(0.0)
            if self.how == "param_fail":
                raise ValueError("forward failed")
        return self.head(h + self.seen)


def _bn(train: bool):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    return m.train(train)


MODELS = {"bn_eval": lambda: _bn(False), "bn_train": lambda: _bn(True),
          **{how: (lambda how=how: _Counting(how))
             for how in ("inplace", "late", "replace", "param", "param_fail")}}


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g))
            for _ in range(3)]


def _run(name: str, fim_type: str, old: bool, monkeypatch):
    torch.manual_seed(0)
    model = MODELS[name]()
    est = fimfast.DiagFisher(model, fim_type, seed=3)
    out = []
    with monkeypatch.context() as mp:
        if old:
            mp.setattr(guard, "step_kept", _old_step_kept)
        for b in _batches():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    est.step(b)
                    out.append(None)
                except Exception as e:  # noqa: BLE001 - compared below
                    out.append((type(e).__name__, str(e), type(e.__context__).__name__))
            out.append([str(x.message) for x in w])
            out.append({k: v.clone() for k, v in model.state_dict().items()})
    return est, out


@pytest.mark.parametrize("fim_type", ["hutchinson", "empirical", "exact"])
@pytest.mark.parametrize("name", list(MODELS))
def test_same_as_the_nested_guards(name, fim_type, monkeypatch):
    a, oa = _run(name, fim_type, False, monkeypatch)
    b, ob = _run(name, fim_type, True, monkeypatch)
    if a.state.steps or b.state.steps:
        assert_same_estimators(a, b)
    assert (a.state.steps, a.offset) == (b.state.steps, b.offset)
    assert len(oa) == len(ob)
    for x, y in zip(oa, ob):
        if isinstance(x, dict):
            assert list(x) == list(y)
            for k in x:
                assert torch.equal(x[k], y[k]), k
        else:
            assert x == y
    if name == "late":  # the warning of a buffer written with no copy to put back
        assert any("in place for the first time" in m for m in oa[4])
    if name == "param":  # the refusal itself (a failed forward's own error is kept)
        assert oa[0] is not None and "wrote into trainable parameter" in oa[0][1]
    if name in ("bn_eval", "bn_train"):
        assert all(x is None for x in oa[0::3])


@pytest.mark.parametrize("name", ["bn_eval", "bn_train", "inplace"])
def test_prepared_hutchinson_of_models_with_buffers(name, monkeypatch):
    took: list = []
    real = prepared.step
    monkeypatch.setattr(prepared, "step", lambda est, b: took.append(real(est, b)) or took[-1])
    a, oa = _run(name, "hutchinson", False, monkeypatch)
    monkeypatch.setattr(prepared, "step", lambda est, b: False)
    b, ob = _run(name, "hutchinson", False, monkeypatch)
    assert took == [True] * 3
    assert_same_estimators(a, b)
    for x, y in zip(oa, ob):
        if isinstance(x, dict):
            assert all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert x == y
    assert next(iter(a.result().values())).abs().max() > 0  # not a vacuous comparison
