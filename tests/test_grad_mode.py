"""The caller's grad mode: a step inside ``torch.no_grad()`` runs with gradients enabled and gives
the estimate it gives outside; inside ``torch.inference_mode()`` (or on a batch of inference
tensors) it is refused with an error naming the cause, the accumulated state kept
(fimfast/grad_mode.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast
from fimfast import FIMType, diag_fim_step, get_diag_fim, zero_diag_fim

_TYPES = [t for t in FIMType]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,),
                                                                                generator=g)


def _opts(t: FIMType) -> dict:
    return {"seed": 3, "num_probes": 2} if t.name.startswith("HUTCHINSON") or \
        t == FIMType.MONTE_CARLO else {}


def _step(model, t, batch, grad: bool):
    est = fimfast.DiagFisher(model, t, **_opts(t))
    if grad:
        est.step(batch)
    else:
        with torch.no_grad():
            est.step(batch)
            assert not torch.is_grad_enabled()  # the caller's mode is restored
    return est.result()


@pytest.mark.parametrize("t", _TYPES, ids=lambda t: t.value)
def test_object_api_under_no_grad_equals_outside(t):
    model, batch = _model(), _batch()
    ref = _step(model, t, batch, True)
    got = _step(model, t, batch, False)
    assert all(float(ref[k].abs().sum()) > 0 for k in ref.keys())  # not vacuous
    for k in ref.keys():
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("t", [FIMType.EXACT, FIMType.HUTCHINSON, FIMType.EMPIRICAL],
                         ids=lambda t: t.value)
def test_seed_api_under_no_grad_equals_outside(t):
    model, batch = _model(), _batch()
    diag_fim_step(model, batch, t, _opts(t))
    ref = {k: v.clone() for k, v in get_diag_fim(model, t).items()}
    zero_diag_fim(model, t)
    with torch.no_grad():
        diag_fim_step(model, batch, t, _opts(t))
    got = get_diag_fim(model, t)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("rep", ["kfac", "dense", "block_diag", "diag"])
def test_structured_under_no_grad_equals_outside(rep):
    model, batch = _model(), _batch()
    ref = fimfast.fisher(model, [batch], "exact", rep)
    with torch.no_grad():
        got = fimfast.fisher(model, [batch], "exact", rep)
    if rep == "diag":
        for k in ref.keys():
            assert torch.equal(ref[k], got[k])
    else:
        assert torch.equal(ref.to_dense(), got.to_dense())
        assert float(ref.to_dense().abs().sum()) > 0


def test_train_step_under_no_grad_trains():
    model, batch = _model(), _batch()
    est = fimfast.DiagFisher(model, "exact")
    with torch.no_grad():
        loss = est.train_step(batch)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def _state(est):
    return {k: v.clone() for k, v in est.result().items()}


@pytest.mark.parametrize("t", [FIMType.EXACT, FIMType.HUTCHINSON, FIMType.MONTE_CARLO],
                         ids=lambda t: t.value)
def test_inference_mode_is_refused_state_kept(t):
    model, batch = _model(), _batch()
    est = fimfast.DiagFisher(model, t, **_opts(t))
    est.step(batch)
    before = _state(est)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"DiagFisher\.step .*inference_mode"):
            est.step(batch)
        with pytest.raises(RuntimeError, match=r"fimfast\.diag_fim_step .*inference_mode"):
            diag_fim_step(model, batch, t, _opts(t))
        with pytest.raises(RuntimeError, match=r"fimfast\.fisher .*inference_mode"):
            fimfast.fisher(model, [batch], "exact", "kfac")
    after = _state(est)
    for k in before:
        assert torch.equal(before[k], after[k])
    est.step(batch)  # the refused step drew nothing: as two steps without it
    ref = fimfast.DiagFisher(model, t, **_opts(t))
    ref.step(batch)
    ref.step(batch)
    for k, v in est.result().items():
        assert torch.equal(v, ref.result()[k])


def test_inference_tensor_batch_names_the_cause_state_kept():
    model, batch = _model(), _batch()
    with torch.inference_mode():
        bad = (batch[0].clone(), batch[1].clone())
    for t in (FIMType.EXACT, FIMType.HUTCHINSON, FIMType.EMPIRICAL):
        est = fimfast.DiagFisher(model, t, **_opts(t))
        est.step(batch)
        before = _state(est)
        with pytest.raises(RuntimeError, match="inference tensors"):
            est.step(bad)
        after = _state(est)
        for k in before:
            assert torch.equal(before[k], after[k])
    with pytest.raises(RuntimeError, match="inference tensors"):
        fimfast.fisher(model, [bad], "exact", "kfac")


def test_no_grad_inside_the_forward_is_still_refused():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 4)

        def forward(self, x):
            with torch.no_grad():
                h = self.a(x)
            return self.b(torch.tanh(h))

    model = Frozen().double()
    with torch.no_grad(), pytest.raises(fimfast.UnsupportedModelError, match="'a'"):
        fimfast.DiagFisher(model, "exact").step(_batch())
