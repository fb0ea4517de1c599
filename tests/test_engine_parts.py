"""The per-sample engine's shared pieces: chunk sizes (fimfast.chunks), the compute dtype
(fimfast.dtypes), the typed groups of a plan, and the rule capability ``closed_form_head``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fimfast
from fimfast import chunks
from fimfast.dtypes import compute_dtype
from fimfast.persample.plan import GroupKind, GroupState
from fimfast.rules import LinearRule, register_rule, unregister_rule


def test_compute_dtype():
    assert compute_dtype(torch.float64) is torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert compute_dtype(dt) is torch.float32
    assert compute_dtype(torch.float16, torch.float64) is torch.float64
    assert compute_dtype(torch.bfloat16, torch.float32) is torch.float32
    assert fimfast.ops.compute_dtype is compute_dtype  # one function behind every name


def test_chunk_formulas(monkeypatch):
    monkeypatch.setenv("FIMFAST_MEMORY_BUDGET_MB", "1")  # B = 2**20 bytes
    monkeypatch.setattr(chunks, "SMALL_BYTES", 0)  # the bounds alone (the floor: below)
    B = 2**20
    params = [torch.zeros(10, 5), torch.zeros(7)]  # P = 57
    R, C = 6, 3
    assert chunks.pair_chunk(R, C, params) == B // (8 * (57 + 18))
    assert chunks.pair_chunk(R, C, params, budget=8 * 75 * 3 + 1) == 3
    assert chunks.pair_chunk(R, C, params, budget=1) == 1  # at least one
    assert chunks.generic_columns(R, C, params, num=4) == 4  # capped by the columns
    assert chunks.generic_columns(R, C, params, num=10**9) == B // (8 * 75) // R
    assert chunks.generic_columns(R, C, params, num=4, class_chunk=2) == 2

    class Tap:
        def __init__(self, *shape):
            self.shape = shape

    flat = torch.zeros(R, C, dtype=torch.float64)  # e = 8
    taps = [Tap(6, 4), Tap(2, 6, 5)]  # 84 elements
    assert chunks.probe_columns(flat, taps) == B // (8 * 18 + 4 * 84)
    # per column: cotangent, every tap's gradient, the largest tap once (60 elements)
    u = 8 * 18 + 4 * (84 + 60)
    big = 10**9  # parameters of the step: 8 max(P, 84) - 8 * 84 does not bind
    assert chunks.fast_columns(flat, taps, None, None, big) == B // u
    assert chunks.fast_columns(flat, taps, 30, None, big) == B // (u + 4 * 30)
    assert chunks.fast_columns(flat, taps, 30, 5, big) == 5  # class_chunk wins
    assert chunks.fast_columns(flat, taps, 30, 5, 0, budget=1) == 5
    # twice a training step's least peak (4 P bytes), less the saved outputs and sums, binds
    assert chunks.fast_columns(flat, taps, None, None, 1000) == (8 * 1000 - 8 * 84) // u
    assert chunks.fast_columns(flat, taps, None, None, 50) == 1  # outputs over P: one column
    # streamed: no tap gradient held to the end of the backward
    su = 8 * 18 + 8 * 60
    assert chunks.fast_columns(flat, taps, None, None, 1000, streamed=True) == (
        (4 * 1000 + 8 * 84) // su
    )
    # columns spread evenly over the fewest chunks
    assert [chunks.balanced(9, m) for m in (1, 2, 3, 4, 5, 8, 9, 50)] == [1, 2, 3, 3, 5, 5, 9, 9]
    assert chunks.balanced(1, 0) == 1
    assert chunks.fast_columns(flat, taps, None, None, 10**5, budget=3 * u) == 3
    assert chunks.fast_columns(flat, taps, None, None, 0) == 1  # at least one
    # every step may take SMALL_BYTES of columns, whatever a training step holds; twice that
    # where the training step's least peak, 4 max(P, 84) bytes, is under SMALL_BYTES / 4
    monkeypatch.setattr(chunks, "SMALL_BYTES", 100 * u)
    assert 8 * 4500 - 8 * 84 < 100 * u <= 4 * 4 * 4500  # P = 4500: the floor binds, not small
    assert chunks.fast_columns(flat, taps, None, None, 4500) == 100
    assert chunks.fast_columns(flat, taps, None, None, 4499) == 200  # 4 P < 25 u: small
    assert chunks.fast_columns(flat, taps, None, None, 50) == 200
    assert chunks.fast_columns(flat, taps, None, None, 50, streamed=True) == 200 * u // su
    assert chunks.fast_columns(flat, taps, None, None, 50, budget=3 * u) == 3  # B still caps
    assert chunks.samples_per_chunk(1000) == B // 8000
    assert chunks.rows_per_chunk(1000, 4096) == 4
    assert chunks.rows_per_chunk(10**6, 4096) == 1


class OwnLinear(nn.Linear):
    """An ``nn.Linear`` with a rule of its own."""


class NoClosedForm(LinearRule):
    name = "linear_no_closed_form"
    closed_form_head = False


@pytest.fixture
def own_rule():
    register_rule(OwnLinear, NoClosedForm())
    try:
        yield
    finally:
        unregister_rule(OwnLinear)


def _run(model, batch, fim_type):
    est = fimfast.DiagFisher(model, fim_type, seed=0)
    est.step(batch)
    return est


@pytest.mark.parametrize("fim_type", ["exact", "empirical"])
def test_closed_form_head_is_a_rule_capability(own_rule, fim_type):
    """The logits layer's closed form follows ``Rule.closed_form_head``: without it the head takes
    a backward column like any layer, and both equal the generic path in float64."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    own = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), OwnLinear(6, 5)).double()
    own.load_state_dict(ref.state_dict())
    batch = (torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 5, (7,)))

    closed = _run(ref, batch, fim_type)
    kinds = {g.index: g.kind for g in closed._persample.last_plan.groups}
    assert kinds[2] is GroupKind.HEAD_W and kinds[3] is GroupKind.HEAD_B

    backward = _run(own, batch, fim_type)
    kinds = {g.index: g.kind for g in backward._persample.last_plan.groups}
    assert kinds[2] is GroupKind.OUTER and kinds[3] is GroupKind.VEC
    assert kinds[2] == "outer"  # a str enum: plain strings compare equal

    generic = fimfast.DiagFisher(ref, fim_type, seed=0)
    generic._persample.use_rules = False
    generic.step(batch)
    g = generic.result()
    for est in (closed, backward):
        r = est.result()
        for n in est.names:
            torch.testing.assert_close(r[n], g[n], rtol=1e-10, atol=1e-14)


def test_group_state_starts_empty():
    st = GroupState()
    assert st.S is None and st.Q is None and st.Qcat is None and st.rows is None
    assert not st.root and not st.single
