"""User-defined layer rules: the worked examples of docs/rules.md against the float64 oracle, and
the registration API (:func:`fimfast.register_rule`).

The two rules (``ScaledLinear``, ``LowRankLinear``) are taken from the page's own code blocks, so
the documentation and the test cannot diverge. Each case runs one step in float64; the fast
engine must equal the brute-force per-row Jacobian oracle (tests/oracle.py) to rounding, and its
plan must estimate the custom layers' parameters by their rules (not the generic path).
"""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
from cases import Case
from oracle import oracle
from tolerances import DET_REL_F64
from torch import nn

import fimfast
import fimfast.layers
from fimfast import DiagFisher
from fimfast.hooks import Use
from fimfast.rules import LinearRule, Rule, UseKind, register_rule, rule_for, unregister_rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc_blocks() -> list[str]:
    with open(os.path.join(ROOT, "docs", "rules.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.fixture(scope="module")
def doc():
    """The namespace of the two rule blocks of docs/rules.md (registering both rules), undone
    after the module's tests."""
    blocks = _doc_blocks()
    assert len(blocks) == 3, "docs/rules.md: two rule examples and their usage"
    ns: dict = {}
    try:
        for code in blocks[:2]:
            exec(compile(code, "docs/rules.md", "exec"), ns)
        yield ns
    finally:
        for cls in (ns.get("ScaledLinear"), ns.get("LowRankLinear")):
            if cls is not None:
                with contextlib.suppress(KeyError):
                    unregister_rule(cls)


# --------------------------------------------------------------------------------------------- #
# models and cases
# --------------------------------------------------------------------------------------------- #
class Pool(nn.Module):
    """``body`` on ``(N, T, d)`` (or ``(T, N, d)``), tanh, mean over tokens, Linear head."""

    def __init__(self, body: nn.Module, d: int, C: int, seq_first: bool = False):
        super().__init__()
        self.body, self.head, self.seq_first = body, nn.Linear(d, C), seq_first

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h.mean(0 if self.seq_first else 1))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(model: nn.Module) -> nn.Module:
    """Non-zero biases, so that no term vanishes by construction."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=_gen(p.numel())))
    return model


def _case(ns: dict, name: str) -> Case:
    SL, LR = ns["ScaledLinear"], ns["LowRankLinear"]
    torch.manual_seed(0)
    N, T, C = 5, 4, 3
    if name == "mlp_custom_head":  # the custom layer produces the logits
        model = nn.Sequential(LR(6, 8, rank=2), nn.Tanh(), SL(8, C, scale=0.7))
        x = torch.randn(N, 6, generator=_gen(1))
    elif name == "mlp_custom_body":
        model = nn.Sequential(SL(6, 7, scale=-1.3), nn.Tanh(), LR(7, 5, rank=3), nn.Tanh(),
                              nn.Linear(5, C))
        x = torch.randn(N, 6, generator=_gen(1))
    elif name == "sequence":  # weight shared over the tokens
        model = Pool(nn.Sequential(LR(6, 7, rank=3), nn.Tanh(), SL(7, 7, scale=1.7)), 7, C)
        x = torch.randn(N, T, 6, generator=_gen(1))
    elif name == "sequence_seq_first":  # (T, N, d): the engine finds the batch dim
        model = Pool(nn.Sequential(SL(6, 5, scale=0.4), nn.Tanh(), LR(5, 5, rank=2)), 5, C,
                     seq_first=True)
        x = torch.randn(T, N, 6, generator=_gen(1))
    elif name == "token_level":  # (N, T, C) logits from the custom head
        model = nn.Sequential(LR(6, 8, rank=2), nn.Tanh(), SL(8, C, scale=0.9))
        x = torch.randn(N, T, 6, generator=_gen(1))
        y = torch.randint(0, C, (N, T), generator=_gen(2))
        valid = torch.ones(N, T, dtype=torch.bool)
        return Case(name, _perturb(model), (x, y), _plain, valid, y, "categorical", C)
    else:
        raise KeyError(name)
    y = torch.randint(0, C, (N,), generator=_gen(2))
    valid = torch.ones(N, dtype=torch.bool)
    return Case(name, _perturb(model), (x, y), _plain, valid, y, "categorical", C)


def _plain(model, batch):
    return model(batch[0])


def _rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float(((got[k].double() - ref[k]) ** 2).sum()) for k in ref)
    den = sum(float((ref[k] ** 2).sum()) for k in ref)
    return (num / den) ** 0.5


def _run(case: Case, fim_type: str) -> tuple[dict, DiagFisher]:
    est = DiagFisher(case.model, fim_type, likelihood=case.likelihood, seed=3, class_dim=-1)
    est.step(case.batch)
    return dict(est.result().items()), est


def _custom_names(model: nn.Module, ns: dict) -> set[str]:
    custom = (ns["ScaledLinear"], ns["LowRankLinear"])
    return {
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules()
        if isinstance(m, custom)
        for pn, _ in m.named_parameters(recurse=False)
    }


CASES = ["mlp_custom_head", "mlp_custom_body", "sequence", "sequence_seq_first", "token_level"]


# --------------------------------------------------------------------------------------------- #
# the rules against the oracle
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_user_rule_matches_oracle_f64(doc, name, quantity):
    case = _case(doc, name).to(torch.float64)
    ref = oracle(case, quantity)
    got, est = _run(case, quantity)
    assert _rel(got, ref) <= DET_REL_F64
    plan = est._persample.last_plan
    fast = {est.names[i] for i in plan.fast}
    custom = _custom_names(case.model, doc)
    assert len(custom) >= 5
    assert custom <= fast, plan.reasons  # the rules were taken, not the generic path
    assert not plan.generic, plan.reasons
    # each custom parameter is estimated from its rule's terms
    rules = {type(c.rule).__name__ for g in plan.groups for c, _ in g.members}
    assert {"ScaledLinearRule", "LowRankLinearRule"} <= rules


def test_user_rule_float32_close_to_oracle(doc):
    case = _case(doc, "sequence")
    ref = oracle(case, "exact")
    got, est = _run(case, "exact")
    assert _rel(got, ref) <= 1e-5
    assert _custom_names(case.model, doc) <= {est.names[i] for i in est._persample.last_plan.fast}


def test_docs_usage_block_runs(doc):
    """The last block: fast estimate equals the generic path's (rules unregistered meanwhile)."""
    code = _doc_blocks()[2]
    exec(compile(code, "docs/rules.md", "exec"), dict(doc))
    # registered again by the block
    assert type(rule_for(doc["ScaledLinear"](2, 2, scale=1.0))).__name__ == "ScaledLinearRule"
    assert type(rule_for(doc["LowRankLinear"](2, 2, rank=1))).__name__ == "LowRankLinearRule"


def _run_without_functional(case: Case, fim_type: str) -> tuple[dict, DiagFisher]:
    """As :func:`_run`, functional calls left uncaptured (fimfast/functional.py)."""
    est = DiagFisher(case.model, fim_type, likelihood=case.likelihood, seed=3, class_dim=-1)
    est._persample.functional = False
    est.step(case.batch)
    return dict(est.result().items()), est


def _functional_names(est: DiagFisher) -> set[str]:
    """Parameters estimated from captured functional calls (a Site in place of a module)."""
    from fimfast.rules.functional import Site

    plan = est._persample.last_plan
    return {est.names[g.index] for g in plan.groups
            if any(isinstance(c.module, Site) for c, _ in g.members)}


def test_without_rule_the_layer_takes_the_generic_path_and_agrees(doc):
    """Without its rule, ScaledLinear's own ``F.linear`` is captured as a functional call; with
    functional calls left uncaptured, its parameters take the generic path. Both exact."""
    SL = doc["ScaledLinear"]
    case = _case(doc, "sequence").to(torch.float64)
    ref = oracle(case, "exact")
    saved = unregister_rule(SL)
    try:
        got, est = _run_without_functional(case, "exact")
        got_f, est_f = _run(case, "exact")
    finally:
        register_rule(SL, saved)
    plan = est._persample.last_plan
    generic = {est.names[i] for i in plan.generic}
    assert generic == {"body.2.weight", "body.2.bias"}
    assert plan.reasons[est.names.index("body.2.weight")] == "no rule for its module"
    assert _rel(got, ref) <= DET_REL_F64
    assert not est_f._persample.last_plan.generic
    assert _functional_names(est_f) == {"body.2.weight", "body.2.bias"}
    assert _rel(got_f, ref) <= DET_REL_F64


# --------------------------------------------------------------------------------------------- #
# lookup: subclasses
# --------------------------------------------------------------------------------------------- #
def test_subclass_keeping_forward_takes_the_rule(doc):
    SL = doc["ScaledLinear"]

    class InitScaled(SL):  # only __init__ differs
        def __init__(self, d_in, d_out):
            super().__init__(d_in, d_out, scale=2.0)

    assert type(rule_for(InitScaled(3, 2))).__name__ == "ScaledLinearRule"
    model = nn.Sequential(InitScaled(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4, generator=_gen(4)), torch.randint(0, 3, (6,), generator=_gen(5))
    case = Case("sub", _perturb(model), (x, y), _plain, torch.ones(6, dtype=torch.bool), y,
                "categorical", 3).to(torch.float64)
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    assert not est._persample.last_plan.generic


def test_subclass_overriding_forward_has_no_rule_until_registered(doc):
    SL = doc["ScaledLinear"]

    class Squared(SL):  # a different function: the parent's rule would be wrong
        def forward(self, x):
            return super().forward(x) ** 2

    m = Squared(3, 2, scale=1.0)
    assert rule_for(m) is None
    model = nn.Sequential(Squared(4, 5, scale=0.5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4, generator=_gen(4)), torch.randint(0, 3, (6,), generator=_gen(5))
    case = Case("sub", _perturb(model), (x, y), _plain, torch.ones(6, dtype=torch.bool), y,
                "categorical", 3).to(torch.float64)
    got, est = _run_without_functional(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    assert {est.names[i] for i in est._persample.last_plan.generic} == {"0.weight", "0.bias"}
    # its F.linear is captured as a functional call (fimfast/functional.py): exact too
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    assert _functional_names(est) == {"0.weight", "0.bias"}


def test_builtin_lookup_unchanged():
    assert isinstance(rule_for(nn.Linear(2, 3)), LinearRule)
    # MultiheadAttention's out_proj class keeps Linear's forward
    assert isinstance(rule_for(nn.MultiheadAttention(4, 2).out_proj), LinearRule)

    class Override(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    assert rule_for(Override(2, 3)) is None
    assert rule_for(nn.Embedding(5, 2, scale_grad_by_freq=True)) is None  # not accepted
    assert rule_for(nn.BatchNorm2d(3)).name == "batchnorm"
    assert rule_for(nn.ReLU()) is None


# --------------------------------------------------------------------------------------------- #
# registration errors
# --------------------------------------------------------------------------------------------- #
class _Good(Rule):
    name = "good"

    def capture(self, cap, module, x, y):
        return None

    def terms(self, call, grads):
        return []


def test_register_twice_raises_unless_replace(doc):
    SL = doc["ScaledLinear"]
    m = SL(2, 2, scale=1.0)
    before = rule_for(m)
    with pytest.raises(ValueError, match="already has a rule.*replace=True"):
        register_rule(SL, _Good())
    with pytest.raises(ValueError, match="Linear already has a rule"):
        register_rule(nn.Linear, LinearRule())
    new = _Good()
    register_rule(SL, new, replace=True)
    try:
        assert rule_for(m) is new
    finally:
        register_rule(SL, before, replace=True)
    assert rule_for(m) is before


def test_hf_conv1d_rule_counts_as_registered():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers.pytorch_utils import Conv1D

    from fimfast.rules import HFConv1DRule

    m = Conv1D(3, 2)
    builtin = rule_for(m)
    assert isinstance(builtin, HFConv1DRule)
    with pytest.raises(ValueError, match="Conv1D already has a rule"):
        register_rule(Conv1D, _Good())
    new = _Good()
    register_rule(Conv1D, new, replace=True)
    try:
        assert rule_for(m) is new
    finally:
        register_rule(Conv1D, builtin, replace=True)


def test_register_rejects_bad_arguments():
    class M(nn.Module):
        pass

    with pytest.raises(TypeError, match="module_type"):
        register_rule("Linear", _Good())
    with pytest.raises(TypeError, match="module_type"):
        register_rule(int, _Good())
    with pytest.raises(TypeError, match="rule must be an instance.*got the class _Good"):
        register_rule(M, _Good)
    with pytest.raises(TypeError, match="rule must be an instance"):
        register_rule(M, lambda m: None)

    class NoTerms(Rule):
        def capture(self, cap, module, x, y):
            return None

    with pytest.raises(TypeError, match="NoTerms must implement terms"):
        register_rule(M, NoTerms())

    class NoCapture(Rule):
        def terms(self, call, grads):
            return []

    with pytest.raises(TypeError, match="must implement capture"):
        register_rule(M, NoCapture())
    with pytest.raises(TypeError, match="replace must be a bool"):
        register_rule(M, _Good(), replace=1)
    assert rule_for(M()) is None  # nothing was registered by the failures
    with pytest.raises(KeyError, match="no registered rule"):
        unregister_rule(M)


def test_register_rule_is_public():
    assert fimfast.register_rule is register_rule
    assert "register_rule" in fimfast.__all__
    assert fimfast.layers.rule_for is rule_for  # the compatibility module is the same registry


# --------------------------------------------------------------------------------------------- #
# UseKind
# --------------------------------------------------------------------------------------------- #
def test_use_kind_is_the_string_the_engine_compares():
    assert [k.value for k in UseKind] == ["outer", "rows", "vec"]
    for k in UseKind:
        assert k == k.value and hash(k) == hash(k.value) and str(k) == k.value
    assert {UseKind.OUTER, UseKind.ROWS} == {"outer", "rows"}
    assert UseKind("vec") is UseKind.VEC
    assert Use(torch.zeros(1), UseKind.OUTER).kind == "outer"


# --------------------------------------------------------------------------------------------- #
# a rule returning the wrong terms is caught, naming the rule
# --------------------------------------------------------------------------------------------- #
class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _BadRule(Rule):
    """Linear's capture, with a configurable mistake in the terms."""

    name = "bad"
    transposed = False

    def __init__(self, mistake: str):
        self.mistake = mistake

    def capture(self, cap, module, x, y):
        return LinearRule.capture(self, cap, module, x, y)

    def terms(self, call, grads):
        from fimfast.rules import Outer, Vec, front

        G, tap = grads[0], call.taps[0]
        P = front(G, tap.bdim, tap.lead, extra=1)
        Q = front(call.data["x"], tap.bdim, tap.lead)
        if self.mistake == "count":
            return [Outer(P, Q)]
        if self.mistake == "kind":
            return [Vec(P.sum(2)), Vec(P.sum(2))]
        return [Outer(P, Q[..., :2]), Vec(P.sum(2))]  # "size": half the weight's inputs


@pytest.mark.parametrize(
    "mistake, message",
    [("count", "terms must return a list of one term per use (2); got 1"),
     ("kind", "use 0 (kind 'outer', parameter of shape (3, 4)) needs a term of type Outer; "
              "got Vec"),
     ("size", "use 0 (Outer term) does not fit its parameter block of shape (3, 4)")],
)
def test_wrong_terms_raise_naming_the_rule(mistake, message):
    register_rule(_Lin, _BadRule(mistake))
    try:
        model = nn.Sequential(_Lin(), nn.Tanh(), nn.Linear(3, 2))
        est = DiagFisher(model, "exact", seed=0)
        with pytest.raises(TypeError, match=re.escape("rule _BadRule: " + message)):
            est.step((torch.randn(5, 4), torch.randint(0, 2, (5,))))
    finally:
        unregister_rule(_Lin)
