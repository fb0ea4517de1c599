"""The prepared one-column step (fimfast/persample/prepared.py) against the general path and a
float64 oracle: the same sums bit for bit, counts and offsets included; taken from the second
step of a structure on; and every change the cached program cannot follow (rows left out, a
batch of another layout, an output modified in place, a forward hook, a parameter used outside
its layer, train/eval, a changed parameter set, a failing forward) sends the step to the
general path, with the general path's results and errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from cases import assert_same_estimators, empirical_oracle, lane_batches, lane_mlp

import fimfast
from fimfast import _ext
from fimfast.persample import onecol
from fimfast.persample import prepared as pp

# the prepared step runs where the parameter walk keeps its lists from step to step (the
# extension's check of a walk, fimfast.parameters.ParamWalk); without it every step is general
_PREPARED = _ext.host_function("walk_holds") is not None


def _on(steps: list) -> list:
    """The steps the prepared program runs: ``steps``, or none without the extension."""
    return steps if _PREPARED else []


def _run(model, batches, prepared, monkeypatch, fim_type="empirical", before=None, **kw):
    """The estimator after ``batches`` (on a copy of ``model``) and which steps the prepared
    program ran; ``prepared=False`` turns the prepared step off (the general path).
    ``before(i, model)`` runs before step ``i``."""
    model = copy.deepcopy(model)
    ran = []
    with monkeypatch.context() as mp:
        if not prepared:
            mp.setattr(pp, "step", lambda est, batch: False)
        real = pp._run

        def spy(*a):
            ran.append(step_no)
            return real(*a)

        mp.setattr(pp, "_run", spy)
        est = fimfast.DiagFisher(model, fim_type, seed=3, **kw)
        for step_no, b in enumerate(batches):
            if before is not None:
                before(step_no, model)
            est.step(b)
    return est, ran


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case", ["plain", "torch", "budget", "nobias", "frozen_w", "frozen_b", "conv1d",
             "conv1d_budget", "list"]
)
def test_prepared_equals_the_general_path_and_the_oracle(monkeypatch, fim_type, dtype, case):
    kw = {"backend": "torch"} if case == "torch" else {}  # "torch": no folded products
    if case.endswith("budget"):  # no product kept for the state: the step forms each one
        monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "0.0001")
    if case.startswith("conv1d"):
        pytest.importorskip("transformers", reason="transformers is not installed")
    model = lane_mlp(dtype, bias=case != "nobias", conv1d=case.startswith("conv1d"))
    if case == "frozen_w":  # a lane of a bias alone
        model[2].weight.requires_grad_(False)
    if case == "frozen_b":  # a lane of a weight alone, the logits layer's weight alone
        model[2].bias.requires_grad_(False)
        model[4].bias.requires_grad_(False)
    batches = lane_batches(dtype)
    if case == "list":
        batches = [list(b) for b in batches]
    ref, ran_ref = _run(model, batches, False, monkeypatch, fim_type, **kw)
    est, ran = _run(model, batches, True, monkeypatch, fim_type, **kw)
    assert ran_ref == [] and ran == _on([1, 2, 3])  # from the second step of the structure on
    assert_same_estimators(est, ref)
    plan, plan_ref = est._persample.last_plan, ref._persample.last_plan
    assert plan.lanes == plan_ref.lanes and not plan.generic
    assert [(g.index, g.kind, g.block) for g in plan.groups] == [
        (g.index, g.kind, g.block) for g in plan_ref.groups]
    if fim_type != "empirical":
        return
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    oracle = empirical_oracle(model, batches)
    assert all(float(w.abs().sum()) > 0 for w in oracle)  # no vacuous comparison
    for v, w in zip(est.result().values(), oracle):
        torch.testing.assert_close(v.double(), w, rtol=tol, atol=tol * 1e-3)


def test_missing_gradients_run_the_general_chunk(monkeypatch):
    """A tap without gradient sends the prepared step to the general chunk code on the same
    gradients (forced here on complete ones)."""
    batches = lane_batches()
    ref, _ = _run(lane_mlp(), batches, False, monkeypatch)
    monkeypatch.setattr(onecol, "_complete", lambda grads: False)
    est, ran = _run(lane_mlp(), batches, True, monkeypatch)
    assert ran == _on([1, 2, 3])
    assert_same_estimators(est, ref)


class _Twice(nn.Module):
    """An MLP whose hidden output may be scaled in place, or whose logits may read the first
    weight outside its layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)
        self.inplace = self.outside = self.nograd = self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("failing forward")
        if self.nograd:
            with torch.no_grad():
                self.a(x)
        h = self.a(x)
        if self.inplace:
            h.mul_(1.5)
        z = self.b(torch.tanh(h))
        if self.outside:
            z = z + self.a.weight.sum()
        return z


def _flag(name, at):
    def before(i, model):
        setattr(model, name, i >= at)

    return before


@pytest.mark.parametrize("flag", ["inplace", "outside"])
def test_a_changed_forward_takes_the_general_path(monkeypatch, flag):
    """An output modified in place, a weight used outside its layer: the structure key changes,
    the step takes the general path, bit for bit. The general path taps the modified output by
    an add from then on (a new structure, whose program runs from its second step); the weight
    used outside its layer stays generic (no program)."""
    batches = lane_batches(k=5)
    ref, _ = _run(_Twice(), batches, False, monkeypatch, before=_flag(flag, 2))
    est, ran = _run(_Twice(), batches, True, monkeypatch, before=_flag(flag, 2))
    assert ran == _on([1, 4] if flag == "inplace" else [1])
    assert bool(est._persample.last_plan.generic) == (flag == "outside")
    assert_same_estimators(est, ref)


def test_rows_left_out_and_other_layouts_take_the_general_path(monkeypatch):
    """Rows of ``ignore_index``, a mapping batch, 2-D labels: the general path."""
    model = lane_mlp()
    batches = lane_batches(ignore=True)
    ref, _ = _run(model, batches, False, monkeypatch)
    est, ran = _run(model, batches, True, monkeypatch)
    assert ran == []
    assert_same_estimators(est, ref)
    plain = lane_batches()
    mixed = [plain[0], plain[1], {"input": plain[2][0], "labels": plain[2][1]},
             (plain[3][0], plain[3][1].view(-1, 1)), plain[0]]

    def fwd(model, batch):
        return model(batch["input"] if isinstance(batch, dict) else batch[0])

    est = fimfast.DiagFisher(copy.deepcopy(model), "empirical", seed=3)
    for b in mixed[:2]:
        est.step(b)
    with pytest.raises(ValueError):  # (N, 1) labels for (N, C) logits: the general check
        est.step(mixed[3])
    assert est.state.steps == 2


def test_hooks_added_take_the_general_path(monkeypatch):
    """A global forward hook added after prepared steps changes every call's verdict; a module
    forward hook that rescales the logits layer's output changes nothing the taps read (they
    are before it) but the logits: both equal the general path's."""
    batches = lane_batches(k=6)
    handles = []

    def before(i, model):
        if i == 2:
            handles.append(model[4].register_forward_hook(lambda m, a, out: out * 2.0))
        if i == 4:
            handles.append(nn.modules.module.register_module_forward_hook(lambda m, a, o: None))

    try:
        ref, _ = _run(lane_mlp(), batches, False, monkeypatch, before=before)
        for h in handles:
            h.remove()
        handles.clear()
        est, ran = _run(lane_mlp(), batches, True, monkeypatch, before=before)
    finally:
        for h in handles:
            h.remove()
    # step 2: the logits are no layer's output any more (a new structure, general); step 3 its
    # program; steps 4 and 5: every call refused under the global hook (generic, general path)
    assert ran == _on([1, 3])
    assert est._persample.last_plan.generic
    assert_same_estimators(est, ref)


def test_train_eval_and_a_changed_parameter_set(monkeypatch):
    """train/eval is part of the structure (a new program after one general step); a parameter
    set that changed is refused as the general path refuses it."""
    batches = lane_batches(k=5)

    def before(i, model):
        model.train(i < 2)

    ref, _ = _run(lane_mlp(), batches, False, monkeypatch, before=before)
    est, ran = _run(lane_mlp(), batches, True, monkeypatch, before=before)
    assert ran == _on([1, 3, 4])
    assert_same_estimators(est, ref)
    est.model[2] = nn.Linear(8, 8, bias=False)
    with pytest.raises(ValueError, match="trainable parameters changed"):
        est.step(batches[0])
    assert est.state.steps == 5


def test_errors_leave_the_state(monkeypatch):
    """A forward that fails, a layer called without gradients: the general path's errors, the
    state as it was."""
    model = _Twice()
    est = fimfast.DiagFisher(model, "empirical", seed=3)
    x, y = lane_batches()[0]
    est.step((x, y))
    est.step((x, y))
    before = {k: v.clone() for k, v in est.result().items()}
    model.fail = True
    with pytest.raises(RuntimeError, match="failing forward"):
        est.step((x, y))
    model.fail, model.nograd = False, True
    with pytest.raises(Exception, match="no_grad|without gradients|gradients disabled"):
        est.step((x, y))
    model.nograd = False
    assert est.state.steps == 2 and est.offset == 2 * fimfast.likelihoods.counters_used(1, 5, 4)
    for k, v in est.result().items():
        assert torch.equal(v, before[k])
    est.step((x, y))  # and on again
    assert est.state.steps == 3


def test_conv_and_exact_keep_their_paths(monkeypatch):
    """A model with a layer that is no Linear lane, EXACT and MONTE_CARLO with two draws never
    take the prepared program."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 2, 6, generator=g), torch.randint(0, 4, (5,), generator=g))
               for _ in range(3)]
    ref, _ = _run(conv, batches, False, monkeypatch)
    est, ran = _run(conv, batches, True, monkeypatch)
    assert ran == []
    assert_same_estimators(est, ref)
    for fim_type, kw in (("exact", {}), ("monte_carlo", {"num_probes": 2})):
        est, ran = _run(lane_mlp(), lane_batches(), True, monkeypatch, fim_type, **kw)
        assert ran == []


@pytest.mark.parametrize("fim_type", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("ext", [True, False])
def test_rows_and_column_in_one_call(monkeypatch, fim_type, ext):
    """After a step that ran the program, the row checks and the score column are one call of
    the extension (csrc/one_column_step.cpp) where it loads: the same sums bit for bit, with
    and without it; a batch with ignored rows in between goes to the general path."""
    if not ext:
        monkeypatch.setattr(pp, "_HOST", [None, None])
    plain, ignored = lane_batches(k=5), lane_batches(k=1, ignore=True)
    batches = [*plain[:3], ignored[0], *plain[3:]]
    calls = []
    real = pp._column

    def spy(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(pp, "_column", spy)
    ref, _ = _run(lane_mlp(), batches, False, monkeypatch, fim_type)
    est, ran = _run(lane_mlp(), batches, True, monkeypatch, fim_type)
    assert ran == _on([1, 2, 4, 5])  # not the step of the ignored rows
    built = _ext.host_function("one_column_step") is not None
    assert calls == ([True, False, True] if ext and built else _on([False, False, False]))
    assert_same_estimators(est, ref)


def test_a_state_of_other_parameters_is_refused(monkeypatch):
    """A state put in place of the estimator's own is checked against the parameters before
    the forward, as the general path checks it: a state of another model is refused, the
    prepared step never runs on it."""
    est, ran = _run(lane_mlp(), lane_batches(k=3), True, monkeypatch)
    assert ran == _on([1, 2])
    other = fimfast.DiagFisher(nn.Sequential(nn.Linear(6, 4)), "empirical", seed=3)
    est.state = other.state
    with pytest.raises(ValueError, match="trainable parameters changed"):
        est.step(lane_batches()[0])
    assert other.state.steps == 0
