"""The prepared HUTCHINSON step (fimfast/prepared.py) against the general path and a float64
oracle: the same sums, counts and random stream bit for bit, every check firing with the general
path's message, a failed step leaving the state as it was, and each configuration it does not
cover handed to the general path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from cases import assert_same_estimators
from oracle import one_probe_oracle

import fimfast
from fimfast import UnsupportedModelError, guard, hutchinson, prepared


class _WithUnused(nn.Module):
    """A parameter the logits never depend on: its estimate is zero (its gradient ``None``)."""

    def __init__(self, body):
        super().__init__()
        self.body, self.unused = body, nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def _mlp(dtype=torch.float64, extra=False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return (_WithUnused(m) if extra else m).to(dtype)


def _batches(k=3, n=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g))
            for _ in range(k)]


def _run(model, batches, general, monkeypatch, fim_type="hutchinson", **kw):
    """An estimator's result after ``batches``, through the general path only if ``general``;
    also whether the last step was the prepared one."""
    est = fimfast.DiagFisher(model, fim_type, seed=3, **kw)
    took = []
    with monkeypatch.context() as mp:
        if general:
            mp.setattr(prepared, "step", lambda est, batch: False)
        else:
            real = prepared.step

            def spy(est, batch):
                took.append(real(est, batch))
                return took[-1]

            mp.setattr(prepared, "step", spy)
        for b in batches:
            est.step(b)
    return est, took


@pytest.mark.parametrize("fim_type", ["hutchinson", "hutchinson_dg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", [{}, {"reduction": "mean"}, {"ema": 0.9}, {"extra": True}])
def test_prepared_steps_equal_the_general_path_and_the_oracle(monkeypatch, fim_type, dtype, how):
    how = dict(how)
    extra = how.pop("extra", False)
    m = _mlp(dtype, extra)
    batches = _batches(dtype=dtype)
    ref, _ = _run(m, batches, True, monkeypatch, fim_type, **how)
    est, took = _run(m, batches, False, monkeypatch, fim_type, **how)
    assert took == [True] * 3
    assert_same_estimators(est, ref)
    if how:
        return
    want = one_probe_oracle(m, batches, 3, "dg" if fim_type == "hutchinson_dg" else "hutchinson")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for n, v in est.result().items():
        torch.testing.assert_close(v.double(), want[n], rtol=tol, atol=tol * 1e-3, msg=n)


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x), x.sum()


def test_other_outputs_and_rows_go_through_the_general_rows(monkeypatch):
    """A tuple output, ignored rows and a batch of more rows than one probe chunk: the prepared
    step hands the rows (or the estimate) to the general code, with the same results."""
    batches = _batches()
    ref, _ = _run(_TupleOut(), batches, True, monkeypatch)
    est, took = _run(_TupleOut(), batches, False, monkeypatch)
    assert took == [True] * 3
    assert_same_estimators(est, ref)
    ignored = [(x, torch.where(torch.arange(len(y)) % 2 == 0, y, -100)) for x, y in batches]
    ref, _ = _run(_mlp(), ignored, True, monkeypatch)
    est, _ = _run(_mlp(), ignored, False, monkeypatch)
    assert_same_estimators(est, ref)
    assert est.state.count == 9
    monkeypatch.setattr(hutchinson, "_CHUNK_ELEMS", 8)  # two rows of 4 classes per chunk
    ref, _ = _run(_mlp(), batches, True, monkeypatch)
    est, took = _run(_mlp(), batches, False, monkeypatch)
    assert took == [True] * 3
    assert_same_estimators(est, ref)


def _state(est):
    return ([v.clone() for v in est.state.values], est.state.count, est.state.steps, est.offset)


def _unchanged(est, before):
    vals, count, steps, offset = before
    assert (est.state.count, est.state.steps, est.offset) == (count, steps, offset)
    for a, b in zip(est.state.values, vals):
        assert torch.equal(a, b)


class _Writes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4).double()
        self.write = False

    def forward(self, x):
        if self.write:
            with torch.no_grad():
                self.lin.bias.add_(1.0)
        return self.lin(x)


def test_each_check_fires_with_the_general_message_and_leaves_the_state():
    m = _mlp()
    (x, y), *_ = _batches()
    est = fimfast.DiagFisher(m, "hutchinson", seed=3)
    est.step((x, y))
    est.step((x, y))  # the state holds a sum: the next steps fold into it
    assert est._prepared.mode == "hutchinson"
    before = _state(est)
    bad = {
        "labels must be in": (x, torch.full_like(y, 4)),
        "NaN|finite": (torch.full_like(x, float("nan")), y),
        "labels must have shape": (x, y[:3]),
        "forward failed": (torch.randn(5, 7, dtype=torch.float64), y),
    }
    for match, batch in bad.items():
        with pytest.raises((ValueError, RuntimeError), match=match):
            est.step(batch)
        _unchanged(est, before)
    w = _Writes()
    west = fimfast.DiagFisher(w, "hutchinson", seed=3)
    west.step((x, y))
    west.step((x, y))
    wbefore = _state(west)
    w.write = True
    with pytest.raises(UnsupportedModelError, match="lin.bias"):
        west.step((x, y))
    _unchanged(west, wbefore)


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8).double(), nn.Linear(8, 4).double()

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(torch.tanh(h))


def test_a_module_run_without_gradients_is_refused_and_hooks_are_off_and_back():
    (x, y), *_ = _batches()
    est = fimfast.DiagFisher(_NoGrad(), "hutchinson", seed=3)
    with pytest.raises(UnsupportedModelError, match="'a'"):
        est.step((x, y))
    assert est._prepared.mode == "hutchinson" and est.state.steps == 0
    assert "forward" not in est.model.a.__dict__  # the watch is put back
    m = _mlp()
    seen = []
    h = m[0].weight.register_hook(lambda g: seen.append(1) or g * 0)
    est = fimfast.DiagFisher(m, "hutchinson", seed=3)
    est.step((x, y))
    assert not seen and est.result()["0.weight"].abs().sum() > 0  # the hook was off
    m(x).sum().backward()
    assert seen == [1]  # and back
    h.remove()


def test_a_changed_model_or_options_are_taken_as_the_general_path_takes_them(monkeypatch):
    m = _mlp()
    (x, y), *_ = _batches()
    est = fimfast.DiagFisher(m, "hutchinson", seed=3)
    est.step((x, y))
    prep = est._prepared
    m.extra = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="trainable parameters changed"):
        est.step((x, y))
    assert est.state.steps == 1
    del m.extra
    est.set_options({"seed": 3, "num_probes": 2})
    est.step((x, y))
    assert est._prepared is not prep and est._prepared.mode is None  # two probes: general
    est.set_options({"seed": 3})
    est.step((x, y))
    assert est._prepared.mode == "hutchinson"


@pytest.mark.parametrize(
    "fim_type, model, opts",
    [
        ("hutchinson_sqrt", None, {}),
        ("hutchinson_rank1", None, {}),
        ("hutchinson", None, {"num_probes": 2}),
        ("hutchinson", None, {"forward_fn": lambda m, b: m(b[0])}),
    ],
)
def test_other_configurations_take_the_general_path(monkeypatch, fim_type, model, opts):
    m = _mlp() if model is None else nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).double()
    batches = _batches()
    ref, _ = _run(m, batches, True, monkeypatch, fim_type, **opts)
    est, took = _run(m, batches, False, monkeypatch, fim_type, **opts)
    assert took == [False] * 3 and est._prepared.mode is None
    assert_same_estimators(est, ref)


def test_a_step_imports_neither_dynamo_nor_dtensor():
    """A step of a plain model loads no torch.compile machinery (seconds, and the DTensor module
    that sends later steps through the FSDP2 checks)."""
    code = (
        "import sys, torch, fimfast\n"
        "m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Flatten(), "
        "torch.nn.Linear(8, 3))\n"
        "b = (torch.randint(0, 5, (6, 2)), torch.randint(0, 3, (6,)))\n"
        "for t in ('hutchinson', 'empirical', 'exact'):\n"
        "    fimfast.DiagFisher(m, t, seed=0).step(b)\n"
        "print(sorted(k for k in ('torch._dynamo', 'torch.distributed.tensor') "
        "if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_autocast_turns_to_the_general_estimate(monkeypatch):
    m = _mlp(torch.float32)
    batches = _batches(dtype=torch.float32)
    calls = []
    real = guard.arithmetic
    monkeypatch.setattr(guard, "arithmetic", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _run(m, batches, True, monkeypatch)
        n = len(calls)
        est, took = _run(m, batches, False, monkeypatch)
    assert took == [True] * 3 and len(calls) == 2 * n == 6
    assert_same_estimators(est, ref)


class _Checkpointed(nn.Module):
    """A reentrant checkpoint segment: the watch sees its module run without gradients, and the
    one-probe backward reaches its parameters by a plain backward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8).double(), nn.Linear(8, 4).double()

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.a, x.requires_grad_(), use_reentrant=True)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("host", [True, False])
def test_the_extensions_one_call_or_none_give_the_same_steps(monkeypatch, host):
    """With the extension's one call (rows, probe, reentrant walk) and without it (the Python
    checks and the op), the same sums as the general path, a reentrant checkpoint included."""
    if host:
        if None in prepared._host():
            pytest.skip("the extension's one_probe_step or fold_squares is not built")
    else:
        monkeypatch.setattr(prepared, "_HOST", [None, None, None])
    calls, folds = [], []
    if host:
        real, fold = prepared._HOST[0], prepared._HOST[2]

        def counted_fold(states, grads):
            folds.append(fold(states, grads))
            return folds[-1]

        monkeypatch.setattr(prepared, "_HOST", [lambda *a: calls.append(1) or real(*a),
                                                prepared._HOST[1], counted_fold])
    batches = [(x.clone(), y) for x, y in _batches()]
    for model in (_mlp, _Checkpointed):
        torch.manual_seed(5)
        ref, _ = _run(model(), batches, True, monkeypatch)
        torch.manual_seed(5)
        est, took = _run(model(), batches, False, monkeypatch)
        assert took == [True] * 3
        assert_same_estimators(est, ref)
    assert len(calls) == (6 if host else 0)
    assert folds == ([True] * 4 if host else [])  # the first step of each adopts its squares
    torch.manual_seed(5)
    ref, _ = _run(_mlp(), batches, True, monkeypatch, backend="torch")
    torch.manual_seed(5)
    est, _ = _run(_mlp(), batches, False, monkeypatch, backend="torch")
    assert_same_estimators(est, ref)
    assert len(calls) == (6 if host else 0)  # another backend draws its own probe
    assert len(folds) == (4 if host else 0)  # and its squares are torch's addcmul


def test_one_probe_step_is_the_row_checks_the_op_and_the_walk():
    fn = prepared._host()[0]
    if fn is None:
        pytest.skip("the extension's one_probe_step is not built")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z = torch.randn(7, 5, generator=g).to(dtype).requires_grad_()
        y = torch.randint(0, 5, (7,), generator=g)
        for mode in ("hutchinson", "dg"):
            u, reentrant = fn(z * 1, y, -100, mode, -3, 2**40)
            want = torch.ops.fimfast.probe_logit_grad(z.detach(), mode, -3, 2**40, 1, None, None,
                                                      None, 1.0)[0]
            assert torch.equal(u, want) and u.shape == (7, 5) and not u.requires_grad
            assert reentrant is False
        zt = torch.randn(5, 7, generator=g).to(dtype).t()  # a transposed view is read as such
        want = torch.ops.fimfast.probe_logit_grad(zt, "hutchinson", 1, 0, 1, None, None, None, 1.0)
        assert torch.equal(fn(zt, y, -100, "hutchinson", 1, 0)[0], want[0])
    z = torch.randn(7, 5, dtype=torch.float64)
    assert fn(z, torch.full((7,), 5), -100, "hutchinson", 0, 0) is None  # a label out of range
    assert fn(z, torch.full((7,), -100), -100, "hutchinson", 0, 0) is None  # rows left out
    assert fn(z, y[:6], -100, "hutchinson", 0, 0) is None
    assert fn(z.view(7, 5, 1).expand(7, 5, 2), y, -100, "hutchinson", 0, 0) is None  # 3-D
    bad = z.clone()
    bad[3, 1] = float("inf")
    assert fn(bad, y, -100, "hutchinson", 0, 0) is None
    m = _Checkpointed()
    assert fn(m(torch.randn(7, 6, dtype=torch.float64)), y % 4, -100, "hutchinson", 0, 0)[1]
