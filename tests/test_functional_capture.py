"""Parameters used by functional calls (fimfast/functional.py): the fast per-sample path against
the float64 brute-force oracle (tests/oracle.py), and the uses that must stay on the generic path.

Every case runs one step in float64; EXACT and EMPIRICAL must equal the oracle to rounding, and
MONTE_CARLO (one draw) must equal the oracle's empirical Fisher at the labels the draw samples
(same seed), and the generic path with the same seed (two draws). Each case also checks that the
parameters used functionally were estimated from captured functional calls, not by the generic
path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from cases import Case, check_monte_carlo_same_seed, run_case
from oracle import oracle_flat, row_jacobians
from oracle import rel_error as _rel
from tolerances import DET_REL_F64
from torch import nn
from torch.utils.checkpoint import checkpoint

from fimfast import DiagFisher
from fimfast.rules.functional import Site


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _param(*shape, seed: int, scale: float = 0.4) -> nn.Parameter:
    return nn.Parameter(scale * torch.randn(*shape, generator=_gen(seed)))


# --------------------------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------------------------- #
class TiedLM(nn.Module):
    """GPT-like: token table, learned positions (a bare parameter added), causal attention,
    LayerNorm, and token-level logits through the token table, ``F.linear(h, wte.weight)``."""

    def __init__(self, V: int = 11, d: int = 8, T: int = 5):
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = _param(T, d, seed=1, scale=0.3)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))

    def forward(self, ids):
        h = self.wte(ids) + self.wpe
        a, _ = self.attn(h, h, h, attn_mask=self.mask, need_weights=False)
        h = self.ln(h + torch.tanh(self.fc(h + a)))
        return F.linear(h, self.wte.weight)


class BareClassifier(nn.Module):
    """Bare parameters through ``F.linear`` (weights and biases)."""

    def __init__(self, d: int = 6, h: int = 7, C: int = 4):
        super().__init__()
        self.W1, self.b1 = _param(h, d, seed=2), _param(h, seed=3)
        self.W2, self.b2 = _param(C, h, seed=4), _param(C, seed=5)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.W1, self.b1)), self.W2, self.b2)


class BareConv2d(nn.Module):
    """Bare kernels through ``F.conv2d``: padding 1 with bias, then groups 2, dilation 2, stride
    2 and ``"valid"``; a module head."""

    def __init__(self):
        super().__init__()
        self.k1, self.kb = _param(4, 2, 3, 3, seed=6), _param(4, seed=7)
        self.k2 = _param(4, 2, 2, 2, seed=8)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):  # (N, 2, 7, 7)
        h = torch.tanh(F.conv2d(x, self.k1, self.kb, padding=1))
        h = torch.tanh(F.conv2d(h, self.k2, None, 2, "valid", 2, 2))
        return self.head(h.flatten(1))


class BareConv1d(nn.Module):
    """``F.conv1d`` with ``padding="same"`` (asymmetric for an even kernel) and a bias."""

    def __init__(self):
        super().__init__()
        self.k, self.kb = _param(3, 2, 4, seed=9), _param(3, seed=10)
        self.head = nn.Linear(3 * 6, 3)

    def forward(self, x):  # (N, 2, 6)
        h = torch.tanh(F.conv1d(x, self.k, self.kb, padding="same", dilation=1))
        return self.head(h.flatten(1))


class Matmul(nn.Module):
    """``x @ W + b`` (``W`` stored ``(I, O)``) then ``torch.matmul(h, W2.t())``, ``h @ W3.T``."""

    def __init__(self, d: int = 6, h: int = 7, C: int = 4):
        super().__init__()
        self.W1, self.b1 = _param(d, h, seed=11), _param(h, seed=12)
        self.W2 = _param(h, h, seed=13)
        self.W3 = _param(C, h, seed=14)

    def forward(self, x):
        h = torch.tanh(x @ self.W1 + self.b1)
        h = torch.tanh(torch.matmul(h, self.W2.t()))
        return h @ self.W3.T


class Temperature(nn.Module):
    """A learnable temperature ``logits / tau`` (a scalar), a per-feature gain ``g * h`` and
    the other elementwise forms: ``(h - s) / v``, ``u / (1 + h^2)``, ``c - h``."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.g = _param(d, seed=15)
        self.s, self.v = _param(1, d, seed=16), nn.Parameter(1.5 + 0.1 * torch.randn(d))
        self.u, self.c = _param(d, seed=17), _param(d, seed=18)
        self.head = nn.Linear(d, C)
        self.tau = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        h = torch.tanh(self.g * self.fc(x))
        h = (h - self.s) / self.v
        h = self.u / (1 + h * h) + (self.c - h)
        return self.head(h) / self.tau


class TwiceFunctional(nn.Module):
    """One bare weight used twice through ``F.linear`` (its gradients add per sample)."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.W = _param(d, d, seed=19)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(torch.tanh(F.linear(x, self.W)), self.W)))


class ModuleAndFunctional(nn.Module):
    """An ``nn.Linear`` called as a module and its weight and bias again through ``F.linear``."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(F.linear(h, self.fc.weight, self.fc.bias)))


class SeqFirst(nn.Module):
    """``(T, N, d)`` inputs with ``T == N``: the probe finds the batch dim of functional taps."""

    def __init__(self, d: int = 5, C: int = 3):
        super().__init__()
        self.W, self.pos = _param(d, d, seed=20), _param(4, 1, d, seed=21)
        self.head = nn.Linear(d, C)

    def forward(self, x):  # (T, N, d) -> (N, C)
        h = torch.tanh(F.linear(x + self.pos, self.W))
        return self.head(h.cumsum(0)[-1])


class PerSlot(nn.Module):
    """``x * slot`` with ``slot`` of shape ``(N, d)``: one row per sample of the batch, so sample
    ``n``'s gradient is row ``n`` (the batch dim of the product is not broadcast)."""

    def __init__(self, N: int = 5, d: int = 6, C: int = 4):
        super().__init__()
        self.slot = _param(N, d, seed=22)
        self.head = nn.Linear(d, C)

    def forward(self, x):
        return self.head(torch.tanh(x * self.slot))


# --------------------------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------------------------- #
def _plain(model, batch):
    return model(batch[0])


def _case(name: str) -> Case:
    N, C = 5, 4
    g = _gen(100)
    torch.manual_seed(0)
    if name == "tied_lm":
        model, V, T = TiedLM(), 11, 5
        ids = torch.randint(0, V, (N, T), generator=g)
        y = torch.randint(0, V, (N, T), generator=g)
        return Case(name, model, (ids, y), _plain, torch.ones(N, T, dtype=torch.bool), y,
                    "categorical", V).to(torch.float64)
    if name == "seq_first":
        model, C = SeqFirst(), 3
        x = torch.randn(4, 4, 5, generator=g)
        y = torch.randint(0, C, (4,), generator=g)
        return Case(name, model, (x, y), _plain, torch.ones(4, dtype=torch.bool), y,
                    "categorical", C).to(torch.float64)
    if name == "conv2d":
        model, x, C = BareConv2d(), torch.randn(N, 2, 7, 7, generator=g), 3
    elif name == "conv1d":
        model, x, C = BareConv1d(), torch.randn(N, 2, 6, generator=g), 3
    else:
        model = {"bare_linear": BareClassifier, "matmul": Matmul, "temperature": Temperature,
                 "twice": TwiceFunctional, "module_and_functional": ModuleAndFunctional,
                 "per_slot": PerSlot}[name]()
        x = torch.randn(N, 6, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return Case(name, model, (x, y), _plain, torch.ones(N, dtype=torch.bool), y, "categorical",
                C).to(torch.float64)


CASES = ["tied_lm", "bare_linear", "conv2d", "conv1d", "matmul", "temperature", "twice",
         "module_and_functional", "seq_first", "per_slot"]
# the parameters each case uses through functional calls
FUNCTIONAL = {
    "tied_lm": {"wte.weight", "wpe"},
    "bare_linear": {"W1", "b1", "W2", "b2"},
    "conv2d": {"k1", "kb", "k2"},
    "conv1d": {"k", "kb"},
    "matmul": {"W1", "b1", "W2", "W3"},
    "temperature": {"g", "s", "v", "u", "c", "tau"},
    "twice": {"W"},
    "module_and_functional": {"fc.weight", "fc.bias"},
    "seq_first": {"W", "pos"},
    "per_slot": {"slot"},
}

_RJ: dict = {}


def _jacobians(case: Case):
    if case.name not in _RJ:
        _RJ[case.name] = row_jacobians(case)
    return _RJ[case.name]


def _oracle(case: Case, quantity: str, labels=None) -> dict[str, torch.Tensor]:
    rj = _jacobians(case)
    if labels is not None:
        rj = dataclasses.replace(rj, labels=labels)
    return rj.split(oracle_flat(rj, case.likelihood, quantity))


_run = run_case



def _functional_fast(est: DiagFisher) -> set[str]:
    """Names of the parameters estimated from at least one captured functional call."""
    plan = est._persample.last_plan
    return {
        est.names[g.index] for g in plan.groups if any(isinstance(c.module, Site)
                                                       for c, _ in g.members)
    }


def _assert_captured(case: Case, est: DiagFisher) -> None:
    plan = est._persample.last_plan
    assert not plan.generic, plan.reasons
    assert FUNCTIONAL[case.name] <= _functional_fast(est)


# --------------------------------------------------------------------------------------------- #
# against the oracle
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_functional_uses_match_oracle_f64(name, quantity):
    case = _case(name)
    got, est = _run(case, quantity)
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64
    _assert_captured(case, est)
    # a second step reuses the plan (sites are the same objects): the same again
    est.step(case.batch)
    again = dict(est.result().items())
    assert _rel({k: v / 2 for k, v in again.items()}, _oracle(case, quantity)) <= DET_REL_F64


@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_functional_uses_monte_carlo_same_seed(name):
    case = _case(name)
    _assert_captured(case, check_monte_carlo_same_seed(case, _jacobians(case), DET_REL_F64))


def test_tied_table_sums_its_uses_before_squaring():
    """The table used by the embedding and by the output ``F.linear`` is one group whose per-sample
    gradients add before the square (squaring each use apart would be a different number)."""
    case = _case("tied_lm")
    _, est = _run(case, "exact")
    plan = est._persample.last_plan
    (g,) = [g for g in plan.groups if est.names[g.index] == "wte.weight"]
    assert str(g.kind) == "outer+rows"
    assert {type(c.rule).__name__ for c, _ in g.members} == {"EmbeddingRule",
                                                              "FunctionalLinearRule"}


# --------------------------------------------------------------------------------------------- #
# uses the capture does not recognise: generic path, still exact
# --------------------------------------------------------------------------------------------- #
class Planted(nn.Module):
    """``W`` in ``F.linear`` and also elsewhere: ``W.sum()`` added to the logits, a row of ``W``
    (``kind="index"``) or its transposed view used twice (``kind="view"``)."""

    def __init__(self, kind: str, d: int = 6, C: int = 4):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(d, d)
        self.W = _param(C, d, seed=30)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.kind == "view":
            Wt = self.W.t()
            return h @ Wt + Wt.sum(0)
        z = F.linear(h, self.W)
        return z + (self.W.sum() if self.kind == "sum" else self.W[:, 0])


@pytest.mark.parametrize("kind", ["sum", "index", "view"])
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_unrecognised_use_takes_the_generic_path(kind, quantity):
    g = _gen(3)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    case = Case(f"planted_{kind}", Planted(kind), (x, y), _plain, torch.ones(5, dtype=torch.bool),
                y, "categorical", 4).to(torch.float64)
    got, est = _run(case, quantity)
    plan = est._persample.last_plan
    assert [est.names[i] for i in plan.generic] == ["W"]
    # ``W.sum()`` / ``W[:, 0]`` added to the logits: an uncaptured use, or a weight computed
    # from ``W`` (fimfast/functional_computed.py) next to its use by ``F.linear``
    assert plan.reasons[est.names.index("W")] in (
        "used outside the captured layer calls",
        "used through a computed weight and by another path too")
    assert {"fc.weight", "fc.bias"} <= {est.names[i] for i in plan.fast}
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64


def test_module_call_is_not_captured_twice():
    """``nn.Linear``'s own ``F.linear`` is its rule's; with nothing functional the mode is off
    after the first step."""
    g = _gen(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,))
    est = DiagFisher(model, "exact")
    est.step((x, y))
    plan = est._persample.last_plan
    assert not plan.generic
    assert not any(isinstance(c.module, Site) for g_ in plan.groups for c, _ in g_.members)
    assert est._persample._quiet


class CheckpointedBare(nn.Module):
    """A bare weight inside a non-reentrant checkpoint: captured in the forward (the call runs
    its own operations, so the recomputation, without the capture, saves the same tensors)."""

    def __init__(self, d: int = 6, C: int = 4):
        super().__init__()
        self.W, self.V = _param(d, d, seed=31), _param(C, d, seed=32)

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(F.linear(t, self.W)), x, use_reentrant=False)
        return F.linear(h, self.V)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_non_reentrant_checkpoint_is_captured_exactly(quantity):
    g = _gen(5)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)
    case = Case("ckpt", CheckpointedBare(), (x, y), _plain, torch.ones(5, dtype=torch.bool), y,
                "categorical", 4).to(torch.float64)
    got, est = _run(case, quantity)
    plan = est._persample.last_plan
    assert not plan.generic
    assert _functional_fast(est) == {"W", "V"}
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64


def _compiled(model, backend, x):
    compiled = torch.compile(model, backend=backend)
    try:
        compiled(x)  # the batch's shape: no recompilation with dynamic shapes in the step
    except Exception as exc:  # no working compiler toolchain
        pytest.skip(f"torch.compile(backend={backend!r}) cannot run here: {exc}")
    return compiled


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_captures_functional_calls(backend):
    """A compiled model runs its module eagerly (fimfast/forward.py): captured, exact."""
    case = _case("bare_linear")
    compiled = _compiled(case.model, backend, case.batch[0])
    est = DiagFisher(compiled, "exact", class_dim=-1)
    est.step(case.batch)
    got = {k.removeprefix("_orig_mod."): v for k, v in est.result().items()}
    assert _rel(got, _oracle(case, "exact")) <= DET_REL_F64
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_region_inside_the_forward_stays_exact(backend):
    """Functional calls inside a compiled submodule: captured when the compiled graph runs them
    as torch functions (``eager``), generic when it runs ATen ops (``aot_eager``)."""
    case = _case("bare_linear")
    model = nn.Sequential(copy_of(case.model), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0] = _compiled(model[0], backend, case.batch[0])
    x, y = case.batch[0], torch.randint(0, 3, (5,), generator=_gen(6))
    c2 = Case("compiled_part", model, (x, y), _plain, torch.ones(5, dtype=torch.bool), y,
              "categorical", 3)
    got, est = _run(c2, "exact")
    assert _rel(got, _oracle(c2, "exact")) <= DET_REL_F64
    generic = {est.names[i] for i in est._persample.last_plan.generic}
    assert generic in (set(), {f"0._orig_mod.{n}" for n in ("W1", "b1", "W2", "b2")})


def copy_of(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)
