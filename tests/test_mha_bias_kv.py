"""nn.MultiheadAttention with ``add_bias_kv`` and/or ``add_zero_attn`` on the rule path.

The rule's forward (fimfast/rules/attention.py) appends ``bias_k``/``bias_v`` as a tapped
expansion and the zero position as torch does: its outputs and attention weights must equal
torch's to float64 rounding for every mask, and the per-sample types must equal the float64
oracle of tests/oracle.py (``bias_k``/``bias_v`` included) with no parameter on the generic path.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import Case
from oracle import oracle
from oracle import rel_error as _rel
from tolerances import DET_REL_F64
from torch import nn

from fimfast import DiagFisher, hooks, layers

# a bool key padding mask next to a float attention mask: torch warns, and computes the same
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


class AttnNet(nn.Module):
    """Linear, attention (self or cross over a second projection), then a class head on the
    mean over tokens (``cls``) or per token (``tag``, padded tokens masked as keys)."""

    def __init__(self, task: str, bias_kv: bool, zero: bool, batch_first: bool = True,
                 kdim: int | None = None, mask: str = "none", need_weights: bool = False,
                 bias: bool = True):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.kv = nn.Linear(3, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=bias_kv, add_zero_attn=zero,
                                          batch_first=batch_first, kdim=kdim, vdim=kdim,
                                          bias=bias)
        self.head = nn.Linear(4, 3)
        self.task, self.mask, self.need_weights = task, mask, need_weights

    def forward(self, x, pad=None):
        h = self.inp(x)
        kv = h if self.kv is None else self.kv(x)
        N, T = x.shape[:2]
        am = None
        if self.mask in ("causal", "causal_hint"):
            am = torch.ones(T, T, dtype=torch.bool).triu(1)
        elif self.mask == "float3d":
            am = torch.linspace(-1, 0, 2 * N * T * T).reshape(2 * N, T, T).to(x.dtype)
        kpm = pad if self.mask != "causal_hint" else None
        bf = self.attn.batch_first
        q = h if bf else h.transpose(0, 1)
        k = kv if bf else kv.transpose(0, 1)
        a, _ = self.attn(q, k, k, key_padding_mask=kpm, attn_mask=am,
                         need_weights=self.need_weights, is_causal=self.mask == "causal_hint")
        if not bf:
            a = a.transpose(0, 1)
        a = torch.tanh(a + h)
        return self.head(a.mean(1) if self.task == "cls" else a)


def _case(model: AttnNet, N: int = 4, T: int = 5) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, 3, generator=g)
    pad = torch.zeros(N, T, dtype=torch.bool)
    pad[1, T - 2 :] = True  # padded keys of sample 1
    if model.task == "cls":
        y = torch.randint(0, 3, (N,), generator=g)
        valid = torch.ones(N, dtype=torch.bool)
    else:
        y = torch.randint(0, 3, (N, T), generator=g)
        y[pad] = -100
        valid = ~pad

    def fn(m, b):
        return m(b[0], b[2])

    return Case(model.task, model, (x, y, pad), fn, valid, y, "categorical", 3)


def _run(case: Case, kind: str, rules: bool = True, **opts) -> tuple[dict, DiagFisher]:
    est = DiagFisher(case.model, kind, seed=5, class_dim=-1,
                     forward_fn=lambda m, b: m(b[0], b[2]), **opts)
    est._persample.use_rules = rules
    est.step(case.batch)
    return dict(est.result().items()), est



def _all_fast(est: DiagFisher) -> None:
    plan = est._persample.last_plan
    assert not plan.generic, {est.names[i]: plan.reasons.get(i) for i in plan.generic}
    assert "attn.bias_k" in {est.names[i] for i in plan.fast} or not est.model.attn.bias_k


VARIANTS = [
    dict(bias_kv=True, zero=False),
    dict(bias_kv=False, zero=True),
    dict(bias_kv=True, zero=True),
    dict(bias_kv=True, zero=True, batch_first=False, mask="causal"),
    dict(bias_kv=True, zero=False, kdim=5, mask="float3d", need_weights=True),
    dict(bias_kv=True, zero=True, mask="causal_hint"),
    dict(bias_kv=True, zero=True, bias=False, need_weights=True),
]
IDS = ["-".join(f"{k}={v}" for k, v in d.items()) for d in VARIANTS]


def _model(task: str, v: dict) -> AttnNet:
    torch.manual_seed(0)
    m = AttnNet(task, **v)
    if m.attn.bias_k is not None:  # away from the zero initialisation
        with torch.no_grad():
            m.attn.bias_k.normal_()
            m.attn.bias_v.normal_()
    return m


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
@pytest.mark.parametrize("task", ["cls", "tag"])
def test_exact_matches_oracle(v, task):
    case = _case(_model(task, v)).to(torch.float64)
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    _all_fast(est)


@pytest.mark.parametrize("v", VARIANTS[:4], ids=IDS[:4])
@pytest.mark.parametrize("task", ["cls", "tag"])
def test_empirical_matches_oracle(v, task):
    case = _case(_model(task, v)).to(torch.float64)
    got, est = _run(case, "empirical")
    assert _rel(got, oracle(case, "empirical")) <= DET_REL_F64
    _all_fast(est)


@pytest.mark.parametrize("task", ["cls", "tag"])
def test_monte_carlo_matches_generic_same_seed(task):
    case = _case(_model(task, VARIANTS[2])).to(torch.float64)
    got, est = _run(case, "monte_carlo", num_probes=3)
    _all_fast(est)
    ref, ref_est = _run(case, "monte_carlo", rules=False, num_probes=3)
    assert not ref_est._persample.last_plan.groups  # the reference is the generic path
    assert _rel(got, ref) <= DET_REL_F64


@pytest.mark.parametrize(
    "bias_kv,zero,bf,mask,weights",
    list(itertools.product([False, True], [False, True], [False, True],
                           ["none", "kpm", "causal", "float3d", "causal_hint"], [False, True])),
)
def test_forward_equals_torch(bias_kv, zero, bf, mask, weights):
    if not (bias_kv or zero):
        pytest.skip("covered by tests/test_layers.py")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=bias_kv, add_zero_attn=zero,
                                batch_first=bf).double()
    if bias_kv:
        with torch.no_grad():
            mha.bias_k.normal_()
            mha.bias_v.normal_()
    N, T = 3, 5
    x = torch.randn((N, T, 4) if bf else (T, N, 4), dtype=torch.float64)
    kw: dict = {"need_weights": weights}
    if mask == "kpm":
        kpm = torch.zeros(N, T, dtype=torch.bool)
        kpm[0, -2:] = True
        kw["key_padding_mask"] = kpm
    elif mask == "causal":
        kw["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
    elif mask == "float3d":
        kw["attn_mask"] = torch.randn(2 * N, T, T, dtype=torch.float64)
    elif mask == "causal_hint":
        kw["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
        kw["is_causal"] = True
    ref = mha(x, x, x, **kw)
    cap = hooks.Capture(mha, list(mha.parameters()), layers.rule_for)
    with cap.installed():
        got = mha(x, x, x, **kw)
    assert len(cap.calls) == 1
    for a, b in zip(ref, got, strict=True):
        if a is None:
            assert b is None
            continue
        assert float((a - b).detach().abs().max()) <= 1e-13
    assert layers.rule_for(mha) is not None


def test_later_steps_with_direct_taps():
    case = _case(_model("tag", VARIANTS[2])).to(torch.float64)
    ref = oracle(case, "exact")
    # default chunks (streamed: every output tapped by an add), and one plain backward of every
    # column, the path that learns which outputs to tap directly
    for opts in ({}, {"class_chunk": 10**6}):
        est = DiagFisher(case.model, "exact", class_dim=-1, forward_fn=lambda m, b: m(b[0], b[2]),
                         **opts)
        for k in (1, 2, 3):
            est.step(case.batch)
            got = dict(est.result().items())
            assert _rel({n: g / k for n, g in got.items()}, ref) <= DET_REL_F64
    assert any(key[1] == "bk" for key in est._persample._direct if isinstance(key, tuple))
