"""Weights used through an elementwise function of a parameter: a pruning mask
(``torch.nn.utils.prune``'s ``weight = weight_orig * weight_mask``, or ``F.linear(x, W * mask)``
written in a forward), a fixed gain, ``exp(W)``. The per-sample gradient of ``W`` is the layer's
term times ``ds/dW`` elementwise, so the squares of a parameter with one such use are the layer's
squares times ``(ds/dW)**2`` (``hooks.Use.chain``, ``batch_sums.Sums.scale``): the rules' fast path,
against the float64 brute-force oracle (tests/oracle.py). Several uses of the function, or the
function used elsewhere too, leave the parameter to the generic path, exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from cases import Case, check_fast_twice, check_monte_carlo_same_seed, run_case
from oracle import oracle_flat, row_jacobians
from oracle import rel_error as _rel
from oracle import strip_pruned as _strip
from tolerances import DET_REL_F64
from torch import nn

N, D, C = 6, 7, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(*shape, seed: int) -> torch.Tensor:
    return (torch.rand(*shape, generator=_gen(seed)) > 0.4).float()


def _param(*shape, seed: int) -> nn.Parameter:
    return nn.Parameter(0.5 * torch.randn(*shape, generator=_gen(seed)))


class Functional(nn.Module):
    """Masked weights written in the forward: ``F.linear(x, W * mask, b)``, ``h @ (mask * V)``
    (a weight stored ``(I, O)``), ``(U / g) @ h.T`` (a gain tensor, the left product),
    ``F.conv1d(x, K * mask)``, ``F.linear(h, exp(E))``; the logits layer masked too."""

    def __init__(self):
        super().__init__()
        self.W, self.b = _param(D, D, seed=1), _param(D, seed=2)
        self.V, self.U = _param(D, D, seed=3), _param(D, D, seed=4)
        self.K, self.E = _param(2, 1, 3, seed=5), _param(D, 2 * (D - 2), seed=6)
        self.H = _param(C, D, seed=7)
        for name, shape, seed in (("mW", (D, D), 11), ("mV", (D, D), 12), ("mK", (2, 1, 3), 13),
                                  ("mH", (C, D), 14)):
            self.register_buffer(name, _mask(*shape, seed=seed))
        self.register_buffer("g", 1.0 + torch.rand(D, D, generator=_gen(15)))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.W * self.mW, self.b))
        h = torch.tanh(h @ (self.mV * self.V))
        h = torch.tanh(((self.U / self.g) @ h.T).T)
        c = torch.tanh(F.conv1d(h.unsqueeze(1), self.K * self.mK)).flatten(1)  # (N, 2 (D - 2))
        h = torch.tanh(F.linear(c, self.E.exp() * 0.2))
        return F.linear(h, self.H * self.mH)


def _pruned() -> nn.Module:
    """``torch.nn.utils.prune`` on ``nn.Linear`` (unstructured and structured masks, the logits
    layer too), ``nn.Conv2d`` and ``nn.Embedding`` (a bag of token vectors)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.fc = nn.Linear(4 + 3 * 9, D)
            self.head = nn.Linear(D, C)

        def forward(self, x):
            ids, img = x[:, :3].long(), x[:, 3:].view(-1, 1, 3, 3)
            e = self.emb(ids).sum(1)
            c = torch.tanh(self.conv(img)).flatten(1)
            return self.head(torch.tanh(self.fc(torch.cat([e, c], 1))))

    net = Net()
    prune.l1_unstructured(net.fc, "weight", amount=0.5)
    prune.ln_structured(net.head, "weight", amount=0.25, n=2, dim=1)
    prune.random_unstructured(net.conv, "weight", amount=0.3)
    prune.random_unstructured(net.emb, "weight", amount=0.3)
    prune.l1_unstructured(net.fc, "bias", amount=0.3)
    return net


def _batch(pruned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(100)
    x = torch.randn(N, 3 + 9 if pruned else D, generator=g)
    if pruned:
        x[:, :3] = torch.randint(0, 10, (N, 3), generator=g).float()
    return x, torch.randint(0, C, (N,), generator=g)


def _case(name: str) -> Case:
    model = _pruned() if name == "pruned" else Functional()
    x, y = _batch(name == "pruned")
    return Case(name, _strip(model), (x, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", C).to(torch.float64)


def _oracle(case: Case, quantity: str, labels=None) -> dict[str, torch.Tensor]:
    rj = row_jacobians(case)
    if labels is not None:
        rj = dataclasses.replace(rj, labels=labels)
    return rj.split(oracle_flat(rj, case.likelihood, quantity))


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("name", ["functional", "pruned"])
def test_chained_weights_match_oracle_on_the_fast_path(name, quantity):
    case = _case(name)
    check_fast_twice(case, quantity, _oracle(case, quantity), DET_REL_F64)
    if name == "pruned":  # the model's own attributes are left as they were
        assert not isinstance(case.model.fc.weight, nn.Parameter)
        assert case.model.fc.weight.grad_fn is not None


@pytest.mark.parametrize("name", ["functional", "pruned"])
def test_chained_weights_monte_carlo_same_seed(name):
    case = _case(name)
    est = check_monte_carlo_same_seed(case, row_jacobians(case), DET_REL_F64)
    assert not est._persample.last_plan.generic


def test_a_changed_mask_is_read_at_every_step():
    """The squares of each step are scaled by that step's mask (a mask updated between steps, as
    iterative pruning does), in a sum and in an exponential average."""
    case = _case("functional")
    est = run_case(case, "empirical")[1]
    first = _oracle(case, "empirical")
    case.model.mW.copy_(_mask(D, D, seed=99))
    case.model.mH[0] = 0.0
    est.step(case.batch)
    second = _oracle(case, "empirical")
    want = {k: first[k] + second[k] for k in first}
    assert _rel(dict(est.result().items()), want) <= DET_REL_F64
    assert float(second["H"][0].abs().max()) == 0.0 < float(first["H"][0].abs().max())
    _, e = run_case(case, "empirical", ema=0.5)
    e.step(case.batch)
    assert _rel(dict(e.result().items()), second) <= DET_REL_F64


class Shared(nn.Module):
    """A masked weight used twice (one mask for both uses: the uses add up and the sum is scaled
    once, on the rules' path), a pruned weight also summed into the logits, ``exp(W)`` next to a
    plain use of ``W`` (different chains, or a plain use among them: the generic path)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc, self.W = nn.Linear(D, D), _param(D, D, seed=21)
        self.head = nn.Linear(D, C)
        self.register_buffer("m", _mask(D, D, seed=22))
        if kind == "pruned_summed":
            prune.random_unstructured(self.fc, "weight", amount=0.5)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.kind == "twice":
            s = self.W * self.m
            h = torch.tanh(F.linear(torch.tanh(F.linear(h, s)), s))
        elif self.kind == "exp_and_plain":
            h = torch.tanh(F.linear(h, self.W.exp() * 0.3) + F.linear(h, self.W))
        else:
            h = h + self.fc.weight.sum(0)
        return self.head(h)


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("kind", ["twice", "exp_and_plain", "pruned_summed"])
def test_several_uses_through_functions_are_exact(kind, quantity):
    x, y = _batch(False)
    case = Case(kind, _strip(Shared(kind)), (x, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", C).to(torch.float64)
    got, est = run_case(case, quantity)
    generic = {est.names[i] for i in est._persample.last_plan.generic}
    want = {"twice": set(), "exp_and_plain": {"W"}, "pruned_summed": {"fc.weight_orig"}}
    assert generic == want[kind]
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64


@pytest.mark.parametrize("representation", ["quasi_diag", "kfac", "ekfac"])
def test_structured_per_layer_factors_refuse_a_pruned_module(representation):
    """The per-layer representations read a module's ``weight`` as its parameter: a pruned one
    is refused, naming the module, where the dense family and the diagonal are exact."""
    import fimfast

    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, C))
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    x, y = _batch(False)
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) has a weight made from other"):
        fimfast.fisher(model, [(x, y)], "exact", representation=representation)


class Pruned(nn.Module):
    """One module of each family with a rule, every parameter pruned (weights and biases):
    sequences ``(N, 3, 4)`` through the module, then a mean and a Linear head."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp, self.head = nn.Linear(5, 4), nn.Linear(4, C)
        self.mod = {
            "layernorm": lambda: nn.LayerNorm(4), "groupnorm": lambda: nn.GroupNorm(2, 4),
            "batchnorm": lambda: nn.BatchNorm1d(4), "rmsnorm": lambda: nn.RMSNorm(4),
            "conv_transpose": lambda: nn.ConvTranspose1d(4, 4, 2, padding=1),
            "lstm": lambda: nn.LSTM(4, 4, batch_first=True),
            "rnn": lambda: nn.RNN(4, 4, batch_first=True),
            "mha": lambda: nn.MultiheadAttention(4, 2, batch_first=True),
        }[kind]()
        for name, _ in list(self.mod.named_parameters(recurse=False)):
            prune.random_unstructured(self.mod, name, amount=0.4)
        if kind == "batchnorm":  # running statistics: no coupling of the samples
            self.mod.eval()

    def forward(self, x):
        h = self.inp(x)
        if self.kind in ("groupnorm", "batchnorm", "conv_transpose"):
            h = self.mod(h.transpose(1, 2)).transpose(1, 2)
        elif self.kind in ("lstm", "rnn"):
            h = self.mod(h)[0]
        elif self.kind == "mha":
            h = h + self.mod(h, h, h, need_weights=False)[0]
        else:
            h = self.mod(h)
        return self.head(torch.tanh(h).mean(1))


FAMILIES = ["layernorm", "groupnorm", "batchnorm", "rmsnorm", "conv_transpose", "lstm", "rnn",
            "mha"]


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_pruned_module_families_match_oracle(kind, quantity):
    """Every rule that takes functions of its parameters (``Rule.takes_functions``) on a module
    with all its parameters pruned: the float64 oracle, no parameter on the generic path."""
    torch.manual_seed(3)
    x = torch.randn(N, 3, 5, generator=_gen(5))
    y = torch.randint(0, C, (N,), generator=_gen(6))
    case = Case(kind, _strip(Pruned(kind)), (x, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", C).to(torch.float64)
    got, est = run_case(case, quantity)
    assert not est._persample.last_plan.generic, est._persample.last_plan.reasons
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64


def test_a_rule_without_takes_functions_leaves_a_pruned_module_to_the_generic_path():
    """A registered rule that does not declare ``takes_functions`` (its terms might compare a
    use's parameter with the module's attribute) is not given the pruned weight: its
    parameters take the generic path, exactly."""
    from fimfast.rules import LinearRule

    class Scaled(nn.Linear):
        pass

    class ScaledRule(LinearRule):
        takes_functions = False

    net = nn.Sequential(Scaled(D, D), nn.Tanh(), nn.Linear(D, C))
    prune.random_unstructured(net[0], "weight", amount=0.5)
    x, y = _batch(False)
    case = Case("custom", _strip(net), (x, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", C).to(torch.float64)
    from fimfast.rules.registry import register_rule, unregister_rule

    register_rule(Scaled, ScaledRule())
    try:
        got, est = run_case(case, "exact")
    finally:
        unregister_rule(Scaled)
    generic = {est.names[i] for i in est._persample.last_plan.generic}
    assert generic == {"0.weight_orig", "0.bias"}, est._persample.last_plan.reasons
    assert _rel(got, _oracle(case, "exact")) <= DET_REL_F64


class SummedRNN(nn.Module):
    """A pruned LSTM whose masked weight is also read after its forward (summed into the
    features): the extra use reaches ``weight_hh_l0_orig`` through the model's own masked
    tensor, so the parameter takes the generic path, exactly."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(5, 4), nn.Linear(4, C)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        prune.random_unstructured(self.rnn, "weight_hh_l0", amount=0.4)

    def forward(self, x):
        h = self.rnn(self.inp(x))[0].mean(1)
        return self.head(torch.tanh(h + self.rnn.weight_hh_l0.sum(0)[:4]))


@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_a_pruned_rnn_weight_used_elsewhere_stays_generic_and_exact(quantity):
    x = torch.randn(N, 3, 5, generator=_gen(7))
    y = torch.randint(0, C, (N,), generator=_gen(8))
    case = Case("summed_rnn", _strip(SummedRNN()), (x, y), lambda m, b: m(b[0]),
                torch.ones(N, dtype=torch.bool), y, "categorical", C).to(torch.float64)
    got, est = run_case(case, quantity)
    generic = {est.names[i] for i in est._persample.last_plan.generic}
    assert "rnn.weight_hh_l0_orig" in generic, est._persample.last_plan.reasons
    assert _rel(got, _oracle(case, quantity)) <= DET_REL_F64
