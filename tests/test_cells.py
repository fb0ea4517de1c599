"""``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` looped over time (fimfast/rules/cells.py):
the rules' path against the float64 oracle (tests/oracle.py) for EXACT, EMPIRICAL and
MONTE_CARLO, the forward equal to torch's bit for bit, and the calls it leaves to the generic
path (exact) for the reason named."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from cases import Case, check_fast_twice, check_monte_carlo_same_seed, classifier_case, run_case
from oracle import core_matrix, oracle, rel_error, row_jacobians
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn

import fimfast
import fimfast.rules.cells as cells

N, I, H, C = 5, 4, 5, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _out(h):
    return h[0] if isinstance(h, tuple) else h


class Loop(nn.Module):
    """A cell over the steps of ``x`` ``(N, T, I)`` (``(T, N, I)`` with ``seq_first``), then a
    Linear on the last state; ``h0``: ``None``, ``"zeros"`` (given), ``"param"`` or ``"input"``
    (a Linear of the mean input)."""

    def __init__(self, cell: nn.Module, h0=None, seq_first: bool = False):
        super().__init__()
        self.c, self.o, self.h0, self.seq_first = cell, nn.Linear(H, C), h0, seq_first
        if h0 == "param":
            self.h = nn.Parameter(torch.randn(1, H) * 0.5)
        if h0 == "input":
            self.a = nn.Linear(I, H)
        self.last = None

    def _init(self, x):
        if self.h0 is None:
            return None
        if self.h0 == "zeros":
            h = x.new_zeros(x.shape[0], H)
        elif self.h0 == "param":
            h = self.h.expand(x.shape[0], H)
        else:
            h = torch.tanh(self.a(x.mean(1)))
        return (h, torch.zeros_like(h)) if isinstance(self.c, nn.LSTMCell) else h

    def forward(self, x):
        xs = x.unbind(0 if self.seq_first else 1)
        h = self._init(x.transpose(0, 1) if self.seq_first else x)
        for xt in xs:
            h = self.c(xt, h)
        out = _out(h)
        self.last = out.detach()  # the forward's output, for the bit-for-bit checks
        return self.o(out)


def _cell(kind: str, bias: bool = True) -> nn.Module:
    if kind == "gru":
        return nn.GRUCell(I, H, bias=bias)
    if kind == "lstm":
        return nn.LSTMCell(I, H, bias=bias)
    return nn.RNNCell(I, H, bias=bias, nonlinearity=kind)


def _case(model: nn.Module, T: int, seq_first: bool = False, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = model.double()
    x = torch.randn(*((T, N) if seq_first else (N, T)), I, generator=_gen(11 + T)).double()
    y = torch.randint(0, C, (N,), generator=_gen(13))
    case = classifier_case(model, (x, y), C)
    case.valid = torch.ones(N, dtype=torch.bool)  # x may be sequence first
    return case


KINDS = ["gru", "lstm", "tanh", "relu"]
LOOPS = {f"{k}_T{T}": (k, T) for k, T in zip(KINDS, (4, 5, 6, 7), strict=True)}


def _loop(name: str, **kw) -> Case:
    kind, T = LOOPS[name]
    torch.manual_seed(1)
    return _case(Loop(_cell(kind, kw.pop("bias", True)), **kw), T, kw.get("seq_first", False))


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", sorted(LOOPS))
@pytest.mark.parametrize("opts", [{}, {"bias": False}, {"h0": "zeros"}, {"h0": "input"},
                                  {"seq_first": True}], ids=["plain", "nobias", "h0", "h0_input",
                                                             "seq_first"])
def test_cell_loop_takes_the_rule_and_matches_the_oracle(name, quantity, opts):
    case = _loop(name, **opts)
    check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_cell_loop_monte_carlo_same_seed(name):
    est = check_monte_carlo_same_seed(_loop(name), row_jacobians(_loop(name)), DET_REL_F64)
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_h0_parameter_keeps_the_cell_on_the_rule(name):
    """A learned initial state (expanded to the batch) leaves the cell on its rule; exact."""
    case = _loop(name, h0="param")
    got, est = run_case(case, "exact")
    assert rel_error(got, oracle(case, "exact")) <= DET_REL_F64
    plan = est._persample.last_plan
    names = [n for n, p in case.model.named_parameters()]
    assert not {names[i] for i in plan.generic} & {"c.weight_ih", "c.weight_hh", "c.bias_ih",
                                                   "c.bias_hh"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_is_torch_cell_bit_for_bit(kind, dtype):
    """The captured forward returns torch's cell output exactly; float32 within the float32
    tolerance of the float64 oracle."""
    case = _case(Loop(_cell(kind), h0="input"), 6).to(dtype)
    x = case.batch[0]
    with torch.no_grad():
        case.model(x)
    want = case.model.last.clone()
    got, est = run_case(case, "exact")
    assert not est._persample.last_plan.generic
    assert torch.equal(case.model.last, want)
    if dtype == torch.float32:
        assert rel_error(got, oracle(case, "exact")) <= DET_REL_F32


@pytest.mark.parametrize("kind", ["gru", "lstm", "tanh"])
def test_primitive_steps_off_the_cell_devices(kind, monkeypatch):
    """The steps as primitive ops (the path of devices whose torch cells want a 1-D bias) on the
    CPU: the same Fisher."""
    monkeypatch.setattr(cells, "CELL_DEVICES", ())
    case = _case(Loop(_cell(kind), h0="zeros"), 5)
    check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)


class Decoder(nn.Module):
    """A decoder feeding its own output back: ``x_{t+1} = e(softmax(o(h_t)))``; token-level
    logits ``(N, T, C)`` with ``tokens``, else the mean over the steps."""

    def __init__(self, kind: str, T: int, tokens: bool = False):
        super().__init__()
        self.c, self.o, self.e, self.i = _cell(kind), nn.Linear(H, C), nn.Linear(C, I), nn.Linear(
            I, H)
        self.T, self.tokens = T, tokens

    def forward(self, x):
        h = torch.tanh(self.i(x))
        if isinstance(self.c, nn.LSTMCell):
            h = (h, torch.zeros_like(h))
        inp, outs = x, []
        for _ in range(self.T):
            h = self.c(inp, h)
            y = self.o(_out(h))
            outs.append(y)
            inp = self.e(torch.softmax(y, -1))
        z = torch.stack(outs, 1)
        return z if self.tokens else z.mean(1)


class AttnDecoder(nn.Module):
    """An ``nn.GRU`` encoder and a GRUCell decoder attending over its states at every step."""

    def __init__(self, T: int = 4):
        super().__init__()
        self.enc = nn.GRU(I, H, batch_first=True)
        self.c, self.q, self.o = nn.GRUCell(H + C, H), nn.Linear(H, H), nn.Linear(2 * H, C)
        self.T = T

    def forward(self, x):
        enc, h = self.enc(x)
        h, y = h[0], x.new_zeros(x.shape[0], C)
        for _ in range(self.T):
            a = torch.softmax(torch.einsum("nsh,nh->ns", enc, self.q(h)), -1)
            ctx = torch.einsum("ns,nsh->nh", a, enc)
            h = self.c(torch.cat([ctx, torch.softmax(y, -1)], -1), h)
            y = self.o(torch.cat([h, ctx], -1))
        return y


class BiPair(nn.Module):
    """A forward and a backward cell over the steps, their last states concatenated."""

    def __init__(self, kind: str):
        super().__init__()
        self.f, self.b, self.o = _cell(kind), _cell(kind), nn.Linear(2 * H, C)

    def forward(self, x):
        hf = hb = None
        for t in range(x.shape[1]):
            hf = self.f(x[:, t], hf)
            hb = self.b(x[:, -1 - t], hb)
        return self.o(torch.cat([_out(hf), _out(hb)], -1))


class SharedStack(nn.Module):
    """One cell called twice per step: a two-layer stack whose layers share their weights."""

    def __init__(self, kind: str):
        super().__init__()
        self.i, self.c, self.o = nn.Linear(I, H), nn.GRUCell(H, H) if kind == "gru" else (
            nn.LSTMCell(H, H)), nn.Linear(H, C)

    def forward(self, x):
        h1 = h2 = None
        for t in range(x.shape[1]):
            h1 = self.c(torch.tanh(self.i(x[:, t])), h1)
            h2 = self.c(_out(h1), h2)
        return self.o(_out(h2))


def _tokens_case(kind: str) -> Case:
    torch.manual_seed(3)
    model = Decoder(kind, 5, tokens=True).double()
    x = torch.randn(N, I, generator=_gen(21)).double()
    y = torch.randint(0, C, (N, 5), generator=_gen(22))
    return Case("tokens", model, (x, y), lambda m, b: m(b[0]), torch.ones(N, 5, dtype=torch.bool),
                y, "categorical", C)


MODELS = {
    "decoder_gru": lambda: _case(Decoder("gru", 5), 1),
    "decoder_lstm": lambda: _case(Decoder("lstm", 4), 1),
    "attention_decoder": lambda: _case(AttnDecoder(), 6),
    "bidirectional_gru": lambda: _case(BiPair("gru"), 5),
    "shared_stack_gru": lambda: _case(SharedStack("gru"), 4),
    "shared_stack_lstm": lambda: _case(SharedStack("lstm"), 5),
    "bidirectional_relu": lambda: _case(BiPair("relu"), 4),
    "tokens_gru": lambda: _tokens_case("gru"),
    "tokens_lstm": lambda: _tokens_case("lstm"),
}


def _squeeze(case: Case) -> Case:
    if case.name == "tokens":
        return case
    x, y = case.batch
    return classifier_case(case.model, (x[:, 0] if x.dim() == 3 and x.shape[1] == 1 else x, y),
                           C)


@pytest.mark.parametrize("quantity", ["exact", "empirical", "monte_carlo"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cell_models_take_the_rules(name, quantity):
    case = _squeeze(MODELS[name]())
    if quantity == "monte_carlo":
        est = check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
        assert not est._persample.last_plan.generic
    else:
        check_fast_twice(case, quantity, oracle(case, quantity), DET_REL_F64)


class PerSample(nn.Module):
    """The cell called on one sample at a time (1-D inputs: unbatched calls)."""

    def __init__(self):
        super().__init__()
        self.c, self.o = nn.GRUCell(I, H), nn.Linear(H, C)

    def forward(self, x):
        hs = []
        for n in range(x.shape[0]):
            h = None
            for t in range(x.shape[1]):
                h = self.c(x[n, t], h)
            hs.append(h)
        return self.o(torch.stack(hs))


class SharedWeight(Loop):
    """The cell's ``weight_hh`` also used outside its calls (a penalty-like term)."""

    def forward(self, x):
        return super().forward(x) + self.c.weight_hh.square().sum() * 0.01


@pytest.mark.parametrize("model,generic", [
    (PerSample, {"c.weight_ih", "c.weight_hh", "c.bias_ih", "c.bias_hh"}),
    (lambda: SharedWeight(nn.GRUCell(I, H)), {"c.weight_hh"}),
])
def test_calls_the_rule_cannot_take_are_exact_on_the_generic_path(model, generic):
    torch.manual_seed(2)
    case = _case(model(), 4)
    for quantity in ("exact", "empirical"):
        got, est = run_case(case, quantity)
        assert rel_error(got, oracle(case, quantity)) <= DET_REL_F64
        plan = est._persample.last_plan
        names = [n for n, _ in case.model.named_parameters()]
        assert {names[i] for i in plan.generic} == generic, plan.reasons


def test_autocast_call_runs_torch_forward():
    """Under autocast the cell runs torch's own forward (its parameters then take the generic
    path); without it, the rule's."""
    case = _loop("gru_T4")
    cap = SimpleNamespace(active=True)
    args = (case.model.c, cap, [case.model.c.weight_ih], case.batch[0][:, 0])
    assert cells._plain(*args) is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cells._plain(*args) is True


def test_failed_step_leaves_the_state_unchanged():
    """A state of the wrong shape: torch's cell raises its error, the estimate is unchanged."""
    case = _loop("lstm_T5", h0="zeros")
    est = fimfast.DiagFisher(case.model, "exact")
    est.step(case.batch)
    before = {k: v.clone() for k, v in est.result().items()}
    bad = (case.batch[0][:, :, :3], case.batch[1])
    with pytest.raises(RuntimeError):
        est.step(bad)
    after = dict(est.result().items())
    assert all(torch.equal(before[k], after[k]) for k in before)


class NoRuleGRUCell(nn.GRUCell):
    """A GRUCell whose forward is its own (the same function): no rule."""

    def forward(self, input, hx=None):
        return super().forward(input, hx)


def test_hutchinson_is_unchanged_by_the_rule():
    """HUTCHINSON takes one backward and no rules: the same draws with and without the rule."""
    torch.manual_seed(4)
    a = Loop(nn.GRUCell(I, H)).double()
    b = Loop(NoRuleGRUCell(I, H)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(N, 5, I, generator=_gen(7)).double()
    y = torch.randint(0, C, (N,), generator=_gen(8))
    res = []
    for m in (a, b):
        est = fimfast.DiagFisher(m, "hutchinson", seed=3)
        est.step((x, y))
        res.append(est.result().to_vector())
    assert torch.equal(res[0], res[1])


def test_kfac_refuses_cells():
    case = _loop("gru_T4")
    with pytest.raises(ValueError, match=r"module 'c' \(GRUCell\)"):
        fimfast.fisher(case.model, [case.batch], "exact", representation="kfac")


def test_functional_cell_call_stays_exact():
    """``torch.gru_cell`` called directly on a cell module's parameters (its forward not run):
    the functional capture records it (fimfast/functional_cells.py), exact."""

    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.o = nn.GRUCell(I, H), nn.Linear(H, C)

        def forward(self, x):
            h = x.new_zeros(x.shape[0], H)
            for t in range(x.shape[1]):
                h = torch.gru_cell(x[:, t], h, self.c.weight_ih, self.c.weight_hh,
                                   self.c.bias_ih, self.c.bias_hh)
            return self.o(F.layer_norm(h, (H,)))

    case = _case(Fn(), 4)
    check_fast_twice(case, "exact", oracle(case, "exact"), DET_REL_F64)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_pruned_cell_takes_the_rule(quantity):
    """``torch.nn.utils.prune`` on a cell weight (``weight_ih = weight_ih_orig * mask``): the
    float64 oracle's Fisher. The masked weight is used at every step of the loop, each use with
    the mask as its chain (fimfast/hooks.py ``Use.chain``), one derivative for all: every
    parameter takes the rule."""
    torch.manual_seed(5)
    model = Loop(nn.GRUCell(I, H))
    torch.nn.utils.prune.l1_unstructured(model.c, "weight_ih", amount=0.3)
    case = _case(model, 5)
    got, est = run_case(case, quantity)
    assert rel_error(got, oracle(case, quantity)) <= DET_REL_F64
    names = [n for n, _ in case.model.named_parameters()]
    plan = est._persample.last_plan
    assert not plan.generic, {names[i]: plan.reasons[i] for i in plan.generic}
    assert oracle(case, quantity)["c.weight_ih_orig"].abs().sum() > 0  # not a detached use
    assert (model.c.weight_ih_mask == 0).any()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_structured_dense_is_the_exact_fisher(kind):
    case = _loop("gru_T4" if kind == "gru" else "lstm_T5")
    rj = row_jacobians(case)
    full = torch.einsum("rcp,rcd,rdq->pq", rj.J, core_matrix(rj.z, "categorical"), rj.J)
    got = fimfast.fisher(case.model, [case.batch], "exact", representation="dense",
                         reduction="sum").to_dense().double()
    assert float((got - full).norm() / full.norm()) <= DET_REL_F64
