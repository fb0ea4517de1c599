"""The squares of nn.RNN / nn.LSTM / nn.GRU weights by pairs of time steps
(fimfast/persample/rnn_lane.py): both squares paths (pairs forced on and off) against the
float64 oracle, over the layer's options, the columns in one backward or one at a time, frozen
parameters, float32."""

from __future__ import annotations

import pytest
import torch
from cases import check_fast_twice, run_case
from oracle import oracle, rel_error
from test_recurrent import IDS, VARIANTS, _all_fast, _case, _model, _packed_case
from tolerances import DET_REL_F32, DET_REL_F64

from fimfast import ops
from fimfast.persample import rnn_lane


def _spy(monkeypatch, by_pairs: bool) -> list:
    """Force the cost model to ``by_pairs``; returns the list of the pairs' op calls made for
    the recurrent layers."""
    calls: list = []
    real = ops.pair_gram

    def pair_gram(P, out=None, backend=None):
        calls.append(len(P))
        return real(P, out=out, backend=backend)

    monkeypatch.setattr(rnn_lane, "_by_pairs", lambda *a: by_pairs)
    monkeypatch.setattr(rnn_lane.ops, "pair_gram", pair_gram)
    return calls


@pytest.mark.parametrize("by_pairs", [True, False], ids=["pairs", "per_step"])
@pytest.mark.parametrize("task", ["cls", "tag"])
@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_both_paths_match_the_oracle(v, task, by_pairs, monkeypatch):
    calls = _spy(monkeypatch, by_pairs)
    case = _case(_model(task, v), task).to(torch.float64)
    est = check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)
    _all_fast(est)
    assert bool(calls) == by_pairs
    for g in est._persample.last_plan.groups:
        assert g.state.cell is None  # finished


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("v", [VARIANTS[0], VARIANTS[7], VARIANTS[8]],
                         ids=[IDS[0], IDS[7], IDS[8]])
def test_pairs_over_chunks_of_columns(v, quantity, monkeypatch):
    """The pairs' products added up over one backward per column (and EMPIRICAL's one)."""
    calls = _spy(monkeypatch, True)
    case = _case(_model("tag", v), "tag").to(torch.float64)
    got, est = run_case(case, quantity, class_chunk=1)
    assert rel_error(got, oracle(case, quantity)) <= DET_REL_F64
    _all_fast(est)
    assert calls


@pytest.mark.parametrize("frozen", ["weight_ih_l0", "weight_hh_l0", "bias_hh_l0", "weights"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_pairs_with_frozen_parameters(cell, frozen, monkeypatch):
    _spy(monkeypatch, True)
    case = _case(_model("tag", dict(cell=cell, num_layers=2)), "tag").to(torch.float64)
    names = [n for n, _ in case.model.rnn.named_parameters()]
    off = [n for n in names if n.startswith("weight")] if frozen == "weights" else [frozen]
    for n in off:
        getattr(case.model.rnn, n).requires_grad_(False)
    ref = {k: v for k, v in oracle(case, "exact").items()
           if k.removeprefix("rnn.") not in off}
    assert all(float(v.abs().sum()) > 0 for v in ref.values())  # not vacuous
    check_fast_twice(case, "exact", ref, DET_REL_F64)


def test_pairs_on_a_packed_sequence(monkeypatch):
    calls = _spy(monkeypatch, True)
    case = _packed_case("gru", num_layers=2, bidirectional=True)
    got, est = run_case(case, "exact")
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    assert calls


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_pairs_in_float32(cell, monkeypatch):
    calls = _spy(monkeypatch, True)
    case = _case(_model("tag", dict(cell=cell, bidirectional=True, batch_first=True)), "tag")
    want = oracle(case.to(torch.float64), "exact")
    got, est = run_case(case, "exact")
    assert rel_error(got, want) <= DET_REL_F32
    _all_fast(est)
    assert calls


def test_cost_model_takes_pairs_for_many_columns_only():
    """gru_cls (9 columns) keeps the per-sample products; lstm_tag's 160 columns (EXACT) and
    20 (EMPIRICAL, one per position) take the pairs (the shapes of benchmarks/bench_recurrent.py:
    N 16, T 20, hidden 64, 32 inputs)."""
    cpu = torch.device("cpu")
    assert not rnn_lane._by_pairs(9, 16, 20, 192, 96, cpu)
    assert rnn_lane._by_pairs(160, 16, 20, 256, 96, cpu)
    assert rnn_lane._by_pairs(20, 16, 20, 256, 96, cpu)
    assert not rnn_lane._by_pairs(1, 16, 20, 256, 96, cpu)
    assert not rnn_lane._by_pairs(160, 16, 20, 256, 96, torch.device("meta"))


@pytest.mark.parametrize("v", [VARIANTS[0], VARIANTS[7]], ids=[IDS[0], IDS[7]])
def test_pairs_in_a_streamed_step(v, monkeypatch):
    """One column per backward, the squares formed while it runs (fimfast/persample/stream.py)."""
    from fimfast.persample import engine

    calls = _spy(monkeypatch, True)
    streamed = []

    def columns(*a, **k):
        streamed.append(True)
        return 1, True

    monkeypatch.setattr(engine, "_columns", columns)
    case = _case(_model("tag", v), "tag").to(torch.float64)
    got, est = run_case(case, "exact")
    assert streamed and calls
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    _all_fast(est)
