"""The fixed per-step work of a HUTCHINSON step and of the functional API's cycle: the no-grad
watch, the operators a step runs beside the model's own, a restart that keeps its state, and the
values a read hands out. Each fast path is checked against a plain reference or hand values."""

from __future__ import annotations

import collections
import logging

import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as module_mod

import fimfast
from benchmarks.opcount import OpCounter
from fimfast import UnsupportedModelError, finite, likelihoods, ops, prepared
from fimfast.estimator import trainable_parameters


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).to(dtype)


def _batch(n=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _oracle(model, x, seed, offset=0):
    """One HUTCHINSON probe by hand in float64: the probe of the generator's counters, one
    ``autograd.grad``, squares."""
    names, params = trainable_parameters(model)
    z = model(x)
    u = ops.probe_logit_grad(z.detach(), "hutchinson", seed, offset, 1, backend="torch")[0]
    grads = torch.autograd.grad(z, params, u.to(z.dtype), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g.double() ** 2
            for n, p, g in zip(names, params, grads)}


# -- the no-grad watch -------------------------------------------------------------------------- #
class _Spy(nn.Module):
    """Records, while the model runs, what the watch installed: the global pre-hooks and the
    instance ``forward`` of ``target``."""

    def __init__(self, target):
        super().__init__()
        self.target = [target]  # not a submodule
        self.seen = []

    def forward(self, x):
        t = self.target[0]
        self.seen.append((len(module_mod._global_forward_pre_hooks), t.__dict__.get("forward")))
        return x


class _Watched(nn.Module):
    def __init__(self, frozen_no_grad=False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)
        self.spy = _Spy(self.a)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.frozen_no_grad = frozen_no_grad

    def forward(self, x):
        h = self.spy(torch.tanh(self.a(x)))
        if self.frozen_no_grad:
            with torch.no_grad():  # no trainable parameter there: allowed
                h = h + 0 * self.frozen(h)
        return self.b(h)


def test_watch_wraps_the_owners_only_and_puts_everything_back():
    m = _Watched(frozen_no_grad=True).double()
    own = m.b.forward  # a user's instance forward (here the bound method itself)
    m.b.forward = own
    est = fimfast.DiagFisher(m, "hutchinson", seed=4)
    x, y = _batch()
    est.step((x, y))
    hooks_during, wrapper = m.spy.seen[-1]
    assert hooks_during == len(module_mod._global_forward_pre_hooks) == 0  # no global pre-hook
    assert wrapper is not None and wrapper is not own  # a's forward wrapped during the forward
    # nothing left behind: no instance forward where there was none, the user's one kept
    assert "forward" not in m.a.__dict__ and "forward" not in m.frozen.__dict__
    assert "forward" not in m.spy.__dict__ and m.b.__dict__["forward"] is own
    want = _oracle(m, x, 4)
    for n, v in est.result().items():
        torch.testing.assert_close(v, want[n], rtol=1e-12, atol=0, msg=n)


class _Twice(nn.Module):
    """``a`` runs twice: with gradients, then under ``no_grad`` (its second use is invisible)."""

    def __init__(self, fail=False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)
        self.fail = fail

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.fail:
            raise RuntimeError("boom")
        with torch.no_grad():
            h = h + self.a(h)
        return self.b(h)


def test_watch_refuses_a_module_also_run_without_gradients_and_cleans_up_after_errors():
    m = _Twice().double()
    est = fimfast.DiagFisher(m, "hutchinson", seed=0)
    with pytest.raises(UnsupportedModelError, match="'a'.*gradients disabled"):
        est.step(_batch())
    assert "forward" not in m.a.__dict__ and "forward" not in m.b.__dict__
    m.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        est.step(_batch())
    assert "forward" not in m.a.__dict__ and "forward" not in m.b.__dict__
    assert est.state.steps == 0


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")
def test_watch_of_a_model_holding_a_compiled_module_is_a_global_pre_hook():
    m = _Twice().double()
    m.b = torch.compile(m.b, backend="eager")
    est = fimfast.DiagFisher(m, "hutchinson", seed=0)
    with pytest.raises(UnsupportedModelError, match="'a'.*gradients disabled"):
        est.step(_batch())
    assert est._nograd._wrap is None  # the global pre-hook watched that forward
    assert "forward" not in m.a.__dict__
    assert len(module_mod._global_forward_pre_hooks) == 0


# -- the operators of a step -------------------------------------------------------------------- #
def _views(ops_):
    return {k: v for k, v in ops_.items()
            if k.split(".")[1] in ("t", "view", "detach", "select", "_local_scalar_dense")}


@pytest.mark.parametrize("host", [True, False])
def test_hutchinson_step_runs_the_models_operators_and_its_checks_and_probe(monkeypatch, host):
    if not host:  # the row checks on the torch path (no extension)
        monkeypatch.setattr(finite, "_HOST", ())
        monkeypatch.setattr(prepared, "_HOST", [None, None, None])
    elif not finite._host():
        pytest.skip("the extension's row checks are not built")
    m = _mlp(torch.float32)
    x, y = _batch(dtype=torch.float32)
    params = trainable_parameters(m)[1]
    est = fimfast.DiagFisher(m, "hutchinson", seed=0)
    for _ in range(2):  # warm: cached row indices, first-step state
        est.step((x, y))
    with OpCounter() as c:
        est.step((x, y))
    z = m(x)
    u = torch.randn_like(z)
    acc = [torch.zeros_like(p) for p in params]
    with OpCounter() as ref:  # the arithmetic no step can avoid, the probe aside
        z = m(x)
        g = torch.autograd.grad(z, params, u)
        torch._foreach_addcmul_(acc, g, g)
    got = collections.Counter({k: v for k, v in c.ops.items() if k not in _views(c.ops)})
    want = collections.Counter({k: v for k, v in ref.ops.items() if k not in _views(ref.ops)})
    # beyond it: the fused probe, and on the torch path the label range and the finiteness sum of
    # the row checks (the extension's one call runs no operator); no buffer for the cotangent
    # (empty/zeros + copy_), no stack of the checks on the CPU. The extension's one call of a
    # prepared step (fimfast/prepared.py) runs the probe's kernel itself: its output's empty
    # is the one operator it dispatches
    extra = {"fimfast.probe_logit_grad.default": 1}
    if host and prepared._host()[0] is not None:
        extra = {"aten.empty.memory_format": 1}
    if not host:
        extra.update({"aten.aminmax.default": 1, "aten.sum.default": 1})
    assert got - want == collections.Counter(extra), got - want
    # the extension's fold of the squares (csrc/cpu/fold_squares.cpp) dispatches no operator
    fold = host and prepared._host()[2] is not None
    assert want - got == collections.Counter({"aten._foreach_addcmul_.Scalar": 1} if fold else {})


# -- the functional API's cycle ----------------------------------------------------------------- #
def test_restart_keeps_a_fresh_state_and_follows_a_model_changed_since_the_reset():
    m = _mlp()
    x, y = _batch()
    fimfast.diag_fim_step(m, (x, y), "hutchinson", {"seed": 2})
    est = fimfast.get_estimator(m, "hutchinson")
    fimfast.zero_diag_fim(m, "hutchinson")
    state = est.state
    fimfast.diag_fim_step(m, (x, y), "hutchinson", {"seed": 2})
    assert est.state is state  # the state the reset made was taken as it was
    fimfast.zero_diag_fim(m, "hutchinson")
    m[0].requires_grad_(False)  # the model changes between the reset and the next step
    fimfast.diag_fim_step(m, (x, y), "hutchinson", {"seed": 2})
    got = fimfast.get_diag_fim(m, "hutchinson")
    assert list(got) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    want = _oracle(m, x, 2)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=0, msg=n)
    # without a reset, the same change is refused (nothing to restart from)
    m[0].requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters changed"):
        fimfast.diag_fim_step(m, (x, y), "hutchinson", {"seed": 2})


def test_a_read_is_a_copy_the_next_steps_and_the_caller_do_not_share():
    m = _mlp()
    (x, y), (x2, y2) = _batch(), _batch(7)
    est = fimfast.DiagFisher(m, "hutchinson", seed=5)
    est.step((x, y))
    first = est.result()
    kept = {n: v.clone() for n, v in first.items()}
    est.step((x2, y2))  # the state is added to in place after the read
    for n, v in first.items():
        assert torch.equal(v, kept[n]), n
    second = fimfast.DiagFisher(m, "hutchinson", seed=5)
    second.step((x, y))
    second.step((x2, y2))
    want = {n: v.clone() for n, v in second.result().items()}
    got = est.result()
    for v in got.values():
        v.mul_(0)  # the caller writes into what it read
    off = likelihoods.counters_used(1, 5, 4)
    for n, v in est.result().items():
        torch.testing.assert_close(v, want[n], rtol=0, atol=0, msg=n)
        manual = _oracle(m, x, 5)[n] + _oracle(m, x2, 5, off)[n]
        torch.testing.assert_close(v, manual, rtol=1e-12, atol=1e-15, msg=n)


def test_exact_logs_its_cost_when_info_is_shown_and_formats_nothing_otherwise(caplog):
    m = _mlp()
    x, y = _batch()
    est = fimfast.DiagFisher(m, "exact")
    with caplog.at_level(logging.INFO, logger="fimfast"):
        est.step((x, y))
    msgs = [r.getMessage() for r in caplog.records if r.name == "fimfast"]
    assert msgs == ["EXACT back-propagates C = 4 columns of the core FIM factor for each of the "
                    "R = 5 rows of this batch: 20 (row, class) backward columns, in chunks bounded "
                    "by class_chunk / FIMFAST_MEMORY_BUDGET_MB"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fimfast"):
        est.step((x, y))
    assert not [r for r in caplog.records if r.name == "fimfast"]
    assert est.state.steps == 2
