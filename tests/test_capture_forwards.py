"""The capturing forwards of the per-sample engine (fimfast/rules/forwards.py): the modules whose
rule records its calls from a forward hook are captured by an instance ``forward`` instead, with
the same calls, taps and verdicts; the modules it cannot take keep the hook. Every estimate is
checked against a float64 per-row oracle (tests/oracle.py) and against the hooked capture
(``Engine.hooked``), which must give the same numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from cases import PANEL, make_case
from oracle import oracle, rel_error

import fimfast
from fimfast import hooks, layers
from fimfast.rules.forwards import Forwards

TYPES = ("empirical", "monte_carlo", "exact")


def _run(case, fim_type, hooked, steps=2):
    est = fimfast.DiagFisher(case.model, fim_type, likelihood=case.likelihood, class_dim=-1,
                             seed=3)
    est._persample.hooked = hooked
    for _ in range(steps):
        est.step(case.batch)
    return {k: v.clone() for k, v in est.result().items()}, est


def _left_alone(model):
    for m in model.modules():
        assert "forward" not in m.__dict__, m
        assert not m._forward_hooks and not m._forward_pre_hooks, m


@pytest.mark.parametrize("name", PANEL)
@pytest.mark.parametrize("fim_type", TYPES)
def test_panel_equals_the_hooked_capture_and_the_oracle(name, fim_type):
    case = make_case(name).to(torch.float64)
    got, est = _run(case, fim_type, hooked=False)
    ref, est_h = _run(case, fim_type, hooked=True)
    _left_alone(case.model)
    assert est._persample.last_plan.fast == est_h._persample.last_plan.fast
    assert est._persample.last_plan.generic == est_h._persample.last_plan.generic
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    if fim_type == "exact":
        want = {k: 2 * v for k, v in oracle(case, "exact").items()}
        assert rel_error(got, want) < 1e-10


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.n = nn.LayerNorm(7)
        self.b = nn.Linear(7, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.n(self.a(x)))
        h = self.b(h) + self.b.forward(h)  # a reused module, once called without __call__
        return self.head(torch.tanh(h))


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                generator=g)


def _exact_ref(model, x):
    """Float64 EXACT diagonal by per-row Jacobians (tests/oracle.py's contraction)."""
    from cases import classifier_case

    return oracle(classifier_case(model, (x, None), 3), "exact")


def test_modules_run_the_capturing_forward_and_their_calls_are_fast():
    torch.manual_seed(0)
    m = _Net().double()
    seen = []
    m.head.register_forward_pre_hook(
        lambda mod, args: seen.append([mm.__dict__.get("forward") for mm in (m.a, m.n, m.b)]))
    x, y = _batch()
    got, est = _run(_Case(m, x, y), "exact", hooked=False)
    assert all(f is not None and f.__qualname__.startswith("Forwards._forward")
               for f in seen[-1])
    assert not m.a._forward_hooks and not m.b._forward_hooks
    for mm in (m.a, m.n, m.b):
        assert "forward" not in mm.__dict__
    plan = est._persample.last_plan
    assert plan.generic == [] and len(plan.fast) == 8
    want = _exact_ref(m, x)
    assert rel_error(got, {k: 2 * v for k, v in want.items()}) < 1e-10
    # the hooked capture: forward hooks during the forward, no instance forward
    hooked = []
    m.head.register_forward_pre_hook(
        lambda mod, args: hooked.append([len(mm._forward_hooks) for mm in (m.a, m.n, m.b)]))
    seen.clear()
    ref, est_h = _run(_Case(m, x, y), "exact", hooked=True)
    assert seen[-1] == [None] * 3 and all(n >= 1 for n in hooked[-1])
    # b.forward(h) bypasses the hook: the functional mode records that call (and keeps
    # recording in every step: a forward with a functional call)
    assert est_h._persample.last_plan.generic == []
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=0)


class _Case:
    def __init__(self, model, x, y):
        self.model, self.batch, self.likelihood = model, (x, y), "categorical"


def test_a_users_instance_forward_keeps_the_hook_and_the_estimate_exact():
    torch.manual_seed(0)
    m = _Net().double()
    x, y = _batch()
    est = fimfast.DiagFisher(m, "exact", seed=3)
    est.step((x, y))
    own = m.b.forward  # set after the rules were chosen: the hook leaves the call alone
    m.b.forward = own
    est.step((x, y))
    assert m.b.__dict__["forward"] is own and not m.b._forward_hooks
    plan = est._persample.last_plan
    names = est.names
    assert {names[i] for i in plan.generic} == {"b.weight", "b.bias"}
    want = _exact_ref(m, x)
    got = est.result()
    for k, v in want.items():
        torch.testing.assert_close(got[k], 2 * v, rtol=1e-10, atol=1e-13)


def test_rules_of_their_own_and_compiled_models_keep_the_hooks():
    m = nn.Sequential(nn.Linear(4, 4), nn.EmbeddingBag(5, 4), nn.MultiheadAttention(4, 1))
    params = list(m.parameters())
    targets = hooks.targets(m, params, layers.rule_for)
    f = Forwards(m, targets)
    assert [mm for mm, _, _ in f._wrap] == [m[0], m[1], m[2].out_proj]
    assert [type(mm) for mm, _ in f._rest] == [nn.MultiheadAttention]
    scripted = nn.Sequential(nn.Linear(4, 4), torch.jit.script(nn.Linear(4, 4)))
    f = Forwards(scripted, hooks.targets(scripted, list(scripted.parameters()), layers.rule_for))
    assert f._wrap == []
    dp = nn.DataParallel(nn.Sequential(nn.Linear(4, 4)))
    f_dp = Forwards(dp, hooks.targets(dp, list(dp.parameters()), layers.rule_for))
    assert f_dp._wrap == [] and len(f_dp._rest) == 1
    cap = hooks.Capture(m, params, layers.rule_for)
    assert f.enter(cap, list(targets)) is not f.modules  # another list: left to the hooks


@pytest.mark.parametrize("name", ["bag_sum_offsets_psw", "bag_sum_2d_psw_pad",
                                  "bag_mean_last_twice", "bag_max_2d_twice_norm",
                                  "bag_mean_tokens_tied"])
@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_embedding_bags_take_the_capturing_forward_with_their_offsets_and_weights(name,
                                                                                 fim_type):
    # offsets positional, per_sample_weights by keyword (tests/test_layers_conv_bag.py's Bag):
    # the capturing forward hands the rule all three, as the hook did
    from test_layers_conv_bag import build

    case = build(name).to(torch.float64)
    seen = []
    pre = case.model.bag.register_forward_pre_hook(
        lambda mod, args: seen.append(("forward" in mod.__dict__, len(mod._forward_hooks))))
    got, est = _run(case, fim_type, hooked=False)
    pre.remove()
    assert seen[-1] == (True, 0)  # the last step (the first also plans)
    ref, _ = _run(case, fim_type, hooked=True)
    _left_alone(case.model)
    assert not est._persample.last_plan.generic, est._persample.last_plan.reasons
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    if fim_type == "exact":
        want = {k: 2 * v for k, v in oracle(case, "exact").items()}
        assert rel_error(got, want) < 1e-10


def test_a_failed_forward_puts_the_modules_back_and_leaves_the_state():
    torch.manual_seed(0)
    m = _Net().double()
    x, y = _batch()
    est = fimfast.DiagFisher(m, "empirical")
    est.step((x, y))
    before = {k: v.clone() for k, v in est.result().items()}

    def boom(mod, args, out):
        raise RuntimeError("boom")

    h = m.head.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        est.step((x, y))
    h.remove()
    _left_alone(m)
    assert est.state.steps == 1
    for k, v in est.result().items():
        assert torch.equal(v, before[k]), k
    est.step((x, y))
    assert est.state.steps == 2


def test_a_users_forward_hook_sees_the_tapped_output():
    """A hook rescaling a layer's output acts after the tap, as with the rule's own hook: the
    tap's gradient is the gradient at the layer's own output."""
    torch.manual_seed(0)
    m = _Net().double()
    m.a.register_forward_hook(lambda mod, args, out: 0.5 * out)
    x, y = _batch()
    got, est = _run(_Case(m, x, y), "exact", hooked=False, steps=1)
    assert est._persample.last_plan.generic == []
    want = _exact_ref(m, x)
    assert rel_error(got, want) < 1e-10
