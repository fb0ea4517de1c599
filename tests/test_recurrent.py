"""Rules for nn.RNN / nn.LSTM / nn.GRU and MultiheadAttention with bias_k/bias_v, zero attention.

The recurrent rule replays the layer as unrolled cells (fimfast/rules/recurrent.py): the replay
must give torch's own outputs to float64 rounding (dropout included, same random state), and the
per-sample types must equal the float64 oracle of tests/oracle.py (per-row Jacobians) on
classifiers (last hidden state) and taggers (token logits with padding), every configuration,
with the layers on the rule path (no parameter on the generic path).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import Case
from oracle import oracle
from oracle import rel_error as _rel
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn

from fimfast import DiagFisher, hooks, layers

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def _rnn(cell: str, **kw) -> nn.RNNBase:
    proj = kw.pop("proj", 0)
    if cell == "rnn_relu":
        return nn.RNN(3, 4, nonlinearity="relu", **kw)
    if proj:
        return nn.LSTM(3, 4, proj_size=proj, **kw)
    return CELLS[cell](3, 4, **kw)


class Classifier(nn.Module):
    """The recurrent layer, then a Linear on the last layer's final hidden state(s)."""

    def __init__(self, rnn: nn.RNNBase, C: int = 3, h0: bool = False):
        super().__init__()
        self.rnn, self.h0 = rnn, h0
        D = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(D * (rnn.proj_size or rnn.hidden_size), C)

    def forward(self, x):
        r = self.rnn
        hx = None
        if self.h0:  # a given initial state, computed from the input (so it differs by sample)
            N = x.shape[0 if r.batch_first else 1]
            D = 2 if r.bidirectional else 1
            base = x.mean((1 if r.batch_first else 0, 2)).reshape(1, N, 1)
            h = torch.tanh(base * torch.linspace(-1, 1, r.proj_size or r.hidden_size))
            h = h.expand(D * r.num_layers, N, -1).contiguous()
            c = torch.sin(base * torch.ones(r.hidden_size)).expand(D * r.num_layers, N, -1)
            hx = (h, c.contiguous()) if isinstance(r, nn.LSTM) else h
        _, hn = r(x, hx)
        if isinstance(hn, tuple):
            hn = hn[0]
        D = 2 if r.bidirectional else 1
        last = hn[-D:].transpose(0, 1).reshape(hn.shape[1], -1)
        return self.head(last)


class Tagger(nn.Module):
    """The recurrent layer, then a Linear per token: ``(N, T, C)`` logits."""

    def __init__(self, rnn: nn.RNNBase, C: int = 3):
        super().__init__()
        self.rnn = rnn
        D = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(D * (rnn.proj_size or rnn.hidden_size), C)

    def forward(self, x):
        out, _ = self.rnn(x)
        if not self.rnn.batch_first:
            out = out.transpose(0, 1)
        return self.head(out)


def _case(model: nn.Module, task: str, N: int = 4, T: int = 5, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    bf = model.rnn.batch_first
    x = torch.randn((N, T, 3) if bf else (T, N, 3), generator=g)
    if task == "cls":
        y = torch.randint(0, 3, (N,), generator=g)
        valid = torch.ones(N, dtype=torch.bool)
    else:
        y = torch.randint(0, 3, (N, T), generator=g)
        y[0, T - 2 :] = -100  # padded positions: no row
        y[2, T - 1] = -100
        valid = y != -100
    return Case(task, model, (x, y), lambda m, b: m(b[0]), valid, y, "categorical", 3)


def _run(case: Case, kind: str, **opts) -> tuple[dict, DiagFisher]:
    est = DiagFisher(case.model, kind, seed=11, class_dim=-1, **opts)
    est.step(case.batch)
    return dict(est.result().items()), est



def _all_fast(est: DiagFisher) -> None:
    plan = est._persample.last_plan
    assert not plan.generic, {est.names[i]: plan.reasons.get(i) for i in plan.generic}
    assert {est.names[i] for i in plan.fast} | {est.names[i] for i in plan.unused} == set(
        est.names
    )


# every option once against a base, plus the full product of the structural ones below
VARIANTS = [
    dict(cell="gru"),
    dict(cell="lstm"),
    dict(cell="rnn"),
    dict(cell="rnn_relu"),
    dict(cell="gru", bias=False),
    dict(cell="lstm", bias=False, batch_first=True),
    dict(cell="lstm", proj=2),
    dict(cell="lstm", proj=2, num_layers=2, bidirectional=True, batch_first=True),
    dict(cell="gru", num_layers=2, bidirectional=True),
    dict(cell="rnn", num_layers=3, batch_first=True),
    dict(cell="gru", bidirectional=True, batch_first=True),
]
IDS = ["-".join(f"{k}={v}" for k, v in sorted(d.items())) for d in VARIANTS]


def _model(task: str, v: dict, h0: bool = False) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(v)
    rnn = _rnn(kw.pop("cell"), **kw)
    return Classifier(rnn, h0=h0) if task == "cls" else Tagger(rnn)


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
@pytest.mark.parametrize("task", ["cls", "tag"])
def test_exact_matches_oracle(v, task):
    case = _case(_model(task, v), task).to(torch.float64)
    ref = oracle(case, "exact")
    got, est = _run(case, "exact")
    assert _rel(got, ref) <= DET_REL_F64
    _all_fast(est)


@pytest.mark.parametrize("v", VARIANTS[:3] + VARIANTS[7:9], ids=IDS[:3] + IDS[7:9])
@pytest.mark.parametrize("task", ["cls", "tag"])
def test_empirical_matches_oracle(v, task):
    case = _case(_model(task, v), task).to(torch.float64)
    ref = oracle(case, "empirical")
    got, est = _run(case, "empirical")
    assert _rel(got, ref) <= DET_REL_F64
    _all_fast(est)


@pytest.mark.parametrize("v", [VARIANTS[1], VARIANTS[7], VARIANTS[8]], ids=[IDS[1], IDS[7],
                                                                               IDS[8]])
@pytest.mark.parametrize("task", ["cls", "tag"])
def test_monte_carlo_matches_generic_same_seed(v, task):
    case = _case(_model(task, v), task).to(torch.float64)
    got, est = _run(case, "monte_carlo", num_probes=3)
    _all_fast(est)
    ref_est = DiagFisher(case.model, "monte_carlo", seed=11, class_dim=-1, num_probes=3)
    ref_est._persample.use_rules = False
    ref_est.step(case.batch)
    assert not ref_est._persample.last_plan.groups  # the reference is the generic path
    assert _rel(got, dict(ref_est.result().items())) <= DET_REL_F64


@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn"])
def test_given_initial_state(cell):
    v = dict(cell="lstm", proj=2) if cell == "lstm_proj" else dict(cell=cell)
    v.update(num_layers=2, bidirectional=True)
    case = _case(_model("cls", v, h0=True), "cls").to(torch.float64)
    ref = oracle(case, "exact")
    got, est = _run(case, "exact")
    assert _rel(got, ref) <= DET_REL_F64
    _all_fast(est)


def test_dropout_between_layers_in_train_mode():
    """The replay draws torch's dropout mask; the estimate is the Fisher of the forward that ran
    (the oracle replays the same random state)."""
    for cell in ("gru", "lstm"):
        model = _model("tag", dict(cell=cell, num_layers=2, dropout=0.4)).train()
        case = _case(model, "tag").to(torch.float64)
        torch.manual_seed(5)
        ref = oracle(case, "exact")
        torch.manual_seed(5)
        got, est = _run(case, "exact")
        assert _rel(got, ref) <= DET_REL_F64
        _all_fast(est)


def _replay(mod: nn.Module, x, hx):
    cap = hooks.Capture(mod, list(mod.parameters()), layers.rule_for)
    with cap.installed():
        out = mod(x, hx)
    return out, cap


def _flat(o) -> list:
    return [t for a in o for t in _flat(a)] if isinstance(o, tuple) else [o]


CONFIGS = list(itertools.product(
    ["rnn", "rnn_relu", "lstm", "lstm_proj", "gru"], [1, 2], [False, True], [False, True],
    [False, True], [False, True],
))


@pytest.mark.parametrize("cell,L,bi,bf,bias,h0", CONFIGS)
def test_replay_equals_torch_forward(cell, L, bi, bf, bias, h0):
    """Outputs, final hidden (and cell) states to float64 rounding; train mode with dropout
    between layers from the same random state."""
    proj = 2 if cell == "lstm_proj" else 0
    torch.manual_seed(0)
    kw = dict(num_layers=L, bidirectional=bi, batch_first=bf, bias=bias,
              dropout=0.3 if L > 1 else 0.0)
    m = _rnn("lstm" if proj else cell, proj=proj, **kw).double().train()
    N, T = 5, 6
    x = torch.randn((N, T, 3) if bf else (T, N, 3), dtype=torch.float64)
    hx = None
    if h0:
        D = 2 if bi else 1
        hx = torch.randn(D * L, N, proj or 4, dtype=torch.float64)
        if isinstance(m, nn.LSTM):
            hx = (hx, torch.randn(D * L, N, 4, dtype=torch.float64))
    torch.manual_seed(1)
    ref = m(x, hx)
    torch.manual_seed(1)
    got, cap = _replay(m, x, hx)
    assert len(cap.calls) == 1 and cap.calls[0].module is m  # the replay ran
    for a, b in zip(_flat(ref), _flat(got), strict=True):
        assert a.shape == b.shape
        assert float((a - b).detach().abs().max()) <= 1e-13
    assert "forward" not in m.__dict__  # the patched forward is gone


class Packed(nn.Module):
    """The recurrent layer on a PackedSequence of the batch (lengths 5, 3, 4, 2, unsorted),
    then a Linear classifier on the last layer's final hidden state(s)."""

    def __init__(self, rnn: nn.RNNBase, h0: bool = False):
        super().__init__()
        self.rnn, self.head, self.h0 = rnn, nn.Linear(rnn.proj_size or rnn.hidden_size, 3), h0

    def forward(self, x):
        lengths = torch.tensor([5, 3, 4, 2])
        p = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                              enforce_sorted=False)
        r = self.rnn
        hx = None
        if self.h0:
            D = 2 if r.bidirectional else 1
            h = torch.tanh(x[:, 0, :1]).reshape(1, 4, 1).expand(D * r.num_layers, 4,
                                                                 r.proj_size or r.hidden_size)
            hx = h.contiguous()
            if isinstance(r, nn.LSTM):
                hx = (hx, torch.cos(x[:, 1, :1]).reshape(1, 4, 1).expand(
                    D * r.num_layers, 4, r.hidden_size).contiguous())
        out, hn = r(p, hx)
        if isinstance(hn, tuple):
            hn = hn[0]
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.head(hn[-1]) + padded.sum(1)[:, :3]


def _packed_case(cell: str, h0: bool = False, **kw) -> Case:
    torch.manual_seed(0)
    model = Packed(_rnn(cell, batch_first=True, **kw), h0=h0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    return Case("packed", model, (x, y), lambda m, b: m(b[0]), torch.ones(4, dtype=torch.bool),
                y, "categorical", 3)


PACKED = [dict(cell="gru"), dict(cell="lstm", num_layers=2, bidirectional=True),
          dict(cell="lstm", proj=2, bidirectional=True), dict(cell="rnn", h0=True),
          dict(cell="lstm", h0=True, num_layers=2)]


@pytest.mark.parametrize("v", PACKED, ids=["-".join(f"{k}={x}" for k, x in d.items())
                                           for d in PACKED])
@pytest.mark.parametrize("unrolled", [False, True])
def test_packed_sequence(v, unrolled, monkeypatch):
    """Replayed padded with each ended sample's state kept: output (packed again), final states
    equal torch's, and the estimate the oracle's, on the rule path."""
    from fimfast.rules import recurrent

    if unrolled:
        monkeypatch.setattr(recurrent, "CELL_DEVICES", ())
    case = _packed_case(**v)
    x = case.batch[0]
    rnn = case.model.rnn
    p = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 4, 2]), batch_first=True,
                                          enforce_sorted=False)
    ref = rnn(p)
    got, cap = _replay(rnn, p, None)
    assert len(cap.calls) == 1
    assert torch.equal(got[0].batch_sizes, ref[0].batch_sizes)
    assert torch.equal(got[0].sorted_indices, ref[0].sorted_indices)
    for a, b in zip([ref[0].data, *_flat(ref[1])], [got[0].data, *_flat(got[1])], strict=True):
        assert a.shape == b.shape
        assert float((a - b).detach().abs().max()) <= 1e-13
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    _all_fast(est)


def test_packed_dropout_and_unbatched_take_the_generic_path():
    case = _packed_case("gru", num_layers=2, dropout=0.5)
    case.model.train()
    torch.manual_seed(3)
    ref = oracle(case, "exact")
    torch.manual_seed(3)
    got, est = _run(case, "exact")
    assert _rel(got, ref) <= DET_REL_F64
    plan = est._persample.last_plan
    assert {est.names[i] for i in plan.generic} == {n for n in est.names if n.startswith("rnn")}

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4), nn.Linear(4, 3)

        def forward(self, x):  # one sequence per sample, run unbatched
            return torch.stack([self.head(self.rnn(s)[1][0]) for s in x])

    torch.manual_seed(0)
    model = Unbatched().double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    case = Case("unbatched", model, (x, y), lambda m, b: m(b[0]),
                torch.ones(3, dtype=torch.bool), y, "categorical", 3)
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    plan = est._persample.last_plan  # the head too: it runs on one sample at a time
    assert {n for n in est.names if n.startswith("rnn")} <= {est.names[i] for i in plan.generic}


def test_layers_take_the_rule():
    for m in (nn.RNN(3, 4), nn.LSTM(3, 4, proj_size=2), nn.GRU(3, 4, bidirectional=True)):
        assert layers.rule_for(m) is not None and layers.rule_for(m).name == "recurrent"
    assert "GRU" in layers.known_modules()


def test_reused_layer_and_frozen_weight():
    """The same GRU called twice in one forward (its uses add before the square), and a frozen
    recurrent weight (left out of the estimate, the rest still on the rule path)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 3, batch_first=True), nn.Linear(3, 3)

        def forward(self, x):
            h, _ = self.rnn(x)
            h, _ = self.rnn(torch.tanh(h))
            return self.head(h)

    torch.manual_seed(0)
    model = Twice().double()
    model.rnn.weight_hh_l0.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 5), generator=g)
    case = Case("twice", model, (x, y), lambda m, b: m(b[0]), torch.ones(4, 5, dtype=torch.bool),
                y, "categorical", 3)
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    _all_fast(est)
    assert "rnn.weight_hh_l0" not in est.names


@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj"])
def test_float32_matches_oracle(cell):
    """In float32 (torch's own LSTM forward is then a fused oneDNN layer, not the replay's
    cells): the estimate stays within float32 rounding of the float64 oracle."""
    v = dict(cell="lstm", proj=2) if cell == "lstm_proj" else dict(cell=cell)
    v.update(num_layers=2, batch_first=True)
    case = _case(_model("tag", v), "tag")
    ref = oracle(case, "exact")
    got, est = _run(case, "exact")
    assert _rel(got, ref) <= DET_REL_F32
    _all_fast(est)


def test_later_steps_with_direct_taps():
    """From the second step the engine taps outputs it saw left alone directly (the gate inputs,
    the projection handles): each step still adds the oracle's estimate."""
    v = dict(cell="lstm", proj=2, num_layers=2, bidirectional=True)
    case = _case(_model("tag", v), "tag").to(torch.float64)
    ref = oracle(case, "exact")
    # default chunks (streamed: every output tapped by an add), and one plain backward of every
    # column, the path that learns which outputs to tap directly
    for opts in ({}, {"class_chunk": 10**6}):
        est = DiagFisher(case.model, "exact", class_dim=-1, **opts)
        for k in (1, 2, 3):
            est.step(case.batch)
            got = dict(est.result().items())
            assert _rel({n: g / k for n, g in got.items()}, ref) <= DET_REL_F64
    assert any(key[1] == "gates" for key in est._persample._direct if isinstance(key, tuple)
               and len(key) == 3)


@pytest.mark.parametrize("cell", ["rnn", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("steps", ["cells", "primitive ops"])
def test_unrolled_steps(cell, steps, monkeypatch):
    """The unrolled steps (an LSTM with proj_size, a PackedSequence), forced here for every
    layer: torch's cells, and off the CPU (CUDA's fused cells take no per-sample bias) primitive
    ops, forced on the CPU. The replay still equals torch's forward and the oracle."""
    from fimfast.rules import recurrent, recurrent_scan

    monkeypatch.setattr(recurrent_scan, "applies", lambda *a: False)
    if steps == "primitive ops":
        monkeypatch.setattr(recurrent, "CELL_DEVICES", ())
    v = dict(cell=cell, num_layers=2, bidirectional=True, batch_first=True)
    model = _model("tag", v).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    got, cap = _replay(model.rnn, x, None)
    assert len(cap.calls) == 1
    for a, b in zip(_flat(model.rnn(x)), _flat(got), strict=True):
        assert float((a - b).detach().abs().max()) <= 1e-13
    case = _case(model, "tag").to(torch.float64)
    got, est = _run(case, "exact")
    assert _rel(got, oracle(case, "exact")) <= DET_REL_F64
    _all_fast(est)
