"""The batch norm's recorded forward (fimfast/rules/norm_forward.py): an estimator's steps through
changes of the model between them (train/eval switched, a forward hook registered and removed,
running statistics written, a parameter's requires_grad flipped, a new weight tensor) give the
same results, or the same errors, bit for bit, as the rule's own capture; the recorder takes some
calls and leaves the others."""

from __future__ import annotations

import pytest
import torch
from test_norm_lane import _model
from torch import nn

import fimfast


def _scenario(name: str, off: bool, monkeypatch, spy: list) -> list:
    """Steps of one estimator through changes of the model between them: the results (or the
    errors) after each."""
    from fimfast.rules import forwards, norm_forward

    if off:
        monkeypatch.setattr(forwards, "norm_recorder", lambda m, r: None)
    else:
        make = norm_forward.recorder

        def spied(m, r):
            rec = make(m, r)
            if rec is None:
                return None
            return lambda *a: spy.append(rec(*a)) or spy[-1]

        monkeypatch.setattr(forwards, "norm_recorder", spied)
    model, batches = _model(name)
    bn = next(m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    est = fimfast.DiagFisher(model, "empirical", seed=3)
    out = []

    def step(b):
        try:
            est.step(b)
            out.append({k: v.clone() for k, v in est.result().items()})
        except Exception as e:  # noqa: BLE001 - the same error either way
            out.append(f"{type(e).__name__}: {e}")

    step(batches[0])
    step(batches[1])
    bn.train()  # batch statistics (the running ones updated by the forward)
    step(batches[2])
    bn.eval()
    step(batches[0])
    h = bn.register_forward_hook(lambda m, i, o: o * 2)  # a hook after the tap
    step(batches[1])
    h.remove()
    with torch.no_grad():
        bn.running_var.mul_(3)  # running statistics written between steps
    step(batches[2])
    bn.bias.requires_grad_(False)  # the parameter set changes
    step(batches[0])
    est2 = fimfast.DiagFisher(model, "empirical", seed=3)  # a fresh state on the new set
    est2.step(batches[1])
    out.append(est2.result())
    bn.weight = nn.Parameter(bn.weight.detach() + 1)  # a new tensor for the module
    est3 = fimfast.DiagFisher(model, "empirical", seed=3)
    est3.step(batches[2])
    out.append(est3.result())
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("name", ["bn1d", "bn2d"])
def test_recorded_forward_same_as_the_rules(name, monkeypatch):
    spy: list = []
    a = _scenario(name, False, monkeypatch, spy)
    b = _scenario(name, True, monkeypatch, [])
    assert any(spy) and not all(spy), "the recorder took some calls and left others"
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            assert x == y
            continue
        assert list(x) == list(y)
        for n in x:
            assert torch.equal(x[n], y[n]), n
