"""Adversarial checks, ninth round: what the estimators keep from one step to the next.

fimfast keeps per model structure what makes a step cheap: the plans of the per-sample engine,
the probe's verdicts (which layers keep the samples apart), the prepared one-column and
one-probe steps, the buffer guard, the seed API's estimator. Each test changes the model, its
settings or the batches between steps and compares every step with the float64 oracle of that
step's model and batch (tests/adversarial.py): EXACT, EMPIRICAL, MONTE_CARLO (the labels it
drew), HUTCHINSON and HUTCHINSON_DG (the probes they drew), per parameter tensor.
"""

from __future__ import annotations

import adversarial as adv
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore")

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
DT = torch.float64
N, D, C = 4, 4, 3
TOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(n: int = 4, shape: tuple = (D,)) -> list:
    return [(torch.randn(N, *shape, generator=_gen(10 + i), dtype=DT),
             torch.randint(0, C, (N,), generator=_gen(20 + i))) for i in range(n)]


def _checked(est, ref: dict) -> None:
    assert adv.nonzero(ref)
    assert adv.max_rel(est, ref) < TOL


def _at(k: int, change):
    def before(i, model):
        if i == k:
            change(model)
    return before


# ------------------------------------------------------- a norm's statistics changed between steps


def _bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.BatchNorm1d(5), nn.Linear(5, C))


def _running_stats_dropped(model) -> None:
    # an eval-mode BatchNorm without running statistics normalises with the batch's: the layers
    # below it are coupled across the samples from this step on
    bn = model[2]
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None


@pytest.mark.parametrize("at", [1, 2, 3])
@pytest.mark.parametrize("fim_type", TYPES)
def test_batchnorm_switched_to_batch_statistics_in_eval_mode(fim_type, at):
    """The probe's verdict on the layers below an eval-mode BatchNorm was kept, by a structure
    key that holds the module's ``training`` flag only, when the norm went over to batch
    statistics (no running statistics) in a later step: EMPIRICAL and MONTE_CARLO (whose one
    column leaves the norm's output unfolded, so the graph's operations are the same) took the
    first layer's squares per sample where the samples are coupled."""
    torch.manual_seed(0)
    model = _bn_mlp().double().eval()
    est, ref = adv.run(model, _batches(), fim_type, before=_at(at, _running_stats_dropped))
    _checked(est, ref)


# ------------------------------------------------------------- a module's class swapped in place


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, 2.0 * self.weight, self.bias)


class _ShiftedNorm(nn.LayerNorm):
    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, 2.0 * self.weight,
                                        self.bias, self.eps)


def _ln_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, C))


def _swap(i: int, cls):
    def change(model):
        model[i].__class__ = cls
    return change


CLASS_SWAPS = {
    "Linear -> subclass with its own forward": _swap(0, _DoubledLinear),
    "LayerNorm -> subclass with its own forward": _swap(1, _ShiftedNorm),
    "logits Linear -> subclass with its own forward": _swap(3, _DoubledLinear),
}


@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("name", list(CLASS_SWAPS))
def test_a_module_class_swapped_between_steps(name, at):
    """``module.__class__ = Subclass`` (a subclass whose ``forward`` computes something else)
    after a step: the per-sample engine's list of the modules with a rule, found once per model
    and parameter set, kept the base class's rule for the module, whose squares then missed the
    subclass's function (EXACT, EMPIRICAL, MONTE_CARLO 30% to 67% off)."""
    for fim_type in TYPES:
        torch.manual_seed(0)
        est, ref = adv.run(_ln_mlp().double(), _batches(), fim_type,
                           before=_at(at, CLASS_SWAPS[name]))
        _checked(est, ref)


def test_a_module_class_swapped_and_back_takes_the_rules_again():
    def before(i, model):
        model[0].__class__ = _DoubledLinear if i == 1 else nn.Linear

    for fim_type in TYPES[:3]:
        torch.manual_seed(0)
        model = _ln_mlp().double()
        est, ref = adv.run(model, _batches(), fim_type, before=before)
        _checked(est, ref)
        assert not est._persample.last_plan.generic  # every parameter on the rules again


# ------------------------------------------------------------ max_norm set on a lookup after a step


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(7, 4)
        self.o = nn.Linear(4, C)

    def forward(self, x):
        return self.o(torch.tanh(self.e(x)).mean(1))


def _ids(n: int = 4) -> list:
    return [(torch.randint(0, 7, (N, 5), generator=_gen(30 + i)),
             torch.randint(0, C, (N,), generator=_gen(40 + i))) for i in range(n)]


def _max_norm(i, model):
    model.e.max_norm = {1: 0.6, 2: 0.4, 3: None}.get(i, model.e.max_norm)


@pytest.mark.parametrize("fim_type", TYPES)
def test_max_norm_set_on_a_lookup_after_a_step(fim_type):
    """The guards' list of the lookups with ``max_norm`` was found once per model and parameter
    set: ``max_norm`` set after the first step made the next step's forward renormalise the rows
    it read, which the step refused as a forward writing into its own weights, leaving the table
    renormalised. The list is read at every step now: the step measures the renormalised model,
    as it does when ``max_norm`` is set from the start, and puts the table back."""
    torch.manual_seed(0)
    model = _Bag().double()
    est = adv.fimfast.DiagFisher(model, fim_type, seed=7)
    for i, b in enumerate(_ids()):
        _max_norm(i, model)
        w = model.e.weight.detach().clone()
        est.step(b)
        assert torch.equal(model.e.weight, w)  # the step left the table as it was
    torch.manual_seed(0)
    est, ref = adv.run(_Bag().double(), _ids(), fim_type, before=_max_norm)
    _checked(est, ref)


# ---------------------------------------------- a position table's use changed after a step


class _Positions(nn.Module):
    """A position table read with ``arange(T)`` (ids without a batch dimension, which the
    per-sample capture expands to the batch), its output used as ``mode`` says."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, D)
        self.a = nn.Linear(3, D)
        self.o = nn.Linear(D, C)
        self.mode = "add"

    def forward(self, x):
        p = self.pos(torch.arange(x.shape[1]))
        if self.mode == "mean":
            p = p.mean(0)
        elif self.mode == "first":
            p = p[0]
        elif self.mode == "cumsum":
            p = p.cumsum(0)
        return self.o(torch.tanh(self.a(x) + p).mean(1))


@pytest.mark.parametrize("mode", ["mean", "first", "cumsum"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_a_position_table_used_otherwise_after_a_step(fim_type, mode):
    """The expanded lookup of ids ``(T,)`` was checked against the model's own forward once per
    engine: a forward that reduced or indexed the table's output over the positions from a later
    step on (over the batch once expanded) ran expanded unchecked, and EXACT, EMPIRICAL and
    MONTE_CARLO were 30% to 92% off. The check runs again for a forward of other operations."""
    torch.manual_seed(0)
    est, ref = adv.run(_Positions().double(), _batches(shape=(5, 3)), fim_type,
                       before=_at(2, lambda m: setattr(m, "mode", mode)))
    _checked(est, ref)


# ------------------------------------------------------------- the model converted between steps


@pytest.mark.parametrize("fim_type", TYPES[:4])
def test_a_model_converted_to_float64_after_a_step_keeps_its_float32_state(fim_type):
    """The state's dtype is chosen when it is made (documented on DiagFisher): the float64
    steps of a model converted by ``model.double()`` after a float32 step are added rounded to
    float32, exact to that rounding."""
    torch.manual_seed(0)
    model = _ln_mlp()
    est = adv.fimfast.DiagFisher(model, fim_type, seed=7)
    ref: dict = {}
    for i, (x, y) in enumerate(_batches()):
        if i == 2:
            model.double()
        x = x.to(next(model.parameters()).dtype)
        offset = est.offset
        est.step((x, y))
        for k, v in adv.step_oracle(model, (x, y), fim_type, 7, offset).items():
            ref[k] = ref.get(k, 0) + v.double()
    got = est.result()
    assert all(v.dtype == torch.float32 for v in got.values())
    for k, r in ref.items():
        assert float((got[k].double() - r).norm() / r.norm()) < 1e-5


# --------------------------------------------- a large lookup's settings changed after a step


class _BigBag(nn.Module):
    def __init__(self, rows: int = 1100):
        super().__init__()
        self.e = nn.EmbeddingBag(rows, D, mode="sum")
        self.o = nn.Linear(D, C)

    def forward(self, x):
        return self.o(torch.tanh(self.e(x)))


def _bag_ids(n: int = 4) -> list:
    return [(torch.randint(0, 1100, (N, 5), generator=_gen(50 + i)),
             torch.randint(0, C, (N,), generator=_gen(60 + i))) for i in range(n)]


@pytest.mark.parametrize("mode", ["max", "mean"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_a_large_bag_switched_to_max_after_a_step(fim_type, mode):
    """The HUTCHINSON steps run large lookup tables with a sparse backward, the tables found
    once per parameter set: an ``nn.EmbeddingBag`` set to ``mode="max"`` after a step (no sparse
    backward in torch) was still switched to it, and the step was refused as a forward that
    failed on the batch. Such a table runs dense from then on."""
    torch.manual_seed(0)
    est, ref = adv.run(_BigBag().double(), _bag_ids(), fim_type,
                       before=_at(2, lambda m: setattr(m.e, "mode", mode)))
    _checked(est, ref)


# ------------------------------------------------- modules put in without a registration


def _scaled_backward() -> nn.Module:
    m = nn.Identity()
    m.register_full_backward_hook(lambda mod, gi, go: (gi[0] * 10,))
    return m


def _seq() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, C))


@pytest.mark.parametrize("fim_type", TYPES)
def test_a_module_with_a_backward_hook_put_in_by_its_dictionary(fim_type):
    """``nn.Sequential.insert`` (and a write into ``_modules``) adds a module without torch's
    registration hooks: the guards' walk of the modules, kept while the parameters' ids and the
    registration count held, missed it, and its backward hook (gradients times 10) stayed on
    during the steps: every type 50-99x off. The walk is made again when the estimator's
    parameter walk gives a new list (a module added or replaced)."""
    torch.manual_seed(0)
    est, ref = adv.run(_seq().double(), _batches(), fim_type,
                       before=_at(2, lambda m: m._modules.__setitem__("1", _scaled_backward())))
    _checked(est, ref)


@pytest.mark.parametrize("how", ["reset", "seed API"])
@pytest.mark.parametrize("fim_type", TYPES)
def test_modules_inserted_into_a_sequential_after_a_step(fim_type, how):
    """After ``insert`` (the parameters renamed: the state refuses them until ``reset()`` or
    ``zero_diag_fim``) a module with a backward hook is switched off and an inserted BatchNorm's
    running statistics are put back after the step."""
    torch.manual_seed(0)
    model = _seq().double().train()
    hooked, bn = _scaled_backward(), nn.BatchNorm1d(5).double()  # made (registered) before
    b0, b1 = _batches(2)
    if how == "reset":
        est = adv.fimfast.DiagFisher(model, fim_type, seed=7)
        est.step(b0)
    else:
        adv.fimfast.diag_fim_step(model, b0, fim_type, {"seed": 7})
    model.insert(2, hooked)
    model.insert(1, bn)
    stats = [model[1].running_mean.clone(), model[1].running_var.clone()]
    if how == "reset":
        est.reset()
        offset = est.offset
        est.step(b1)
        got = dict(est.result().items())
    else:
        adv.fimfast.zero_diag_fim(model, fim_type)
        offset = 0
        adv.fimfast.diag_fim_step(model, b1, fim_type, {"seed": 7})
        got = adv.fimfast.get_diag_fim(model, fim_type)
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].running_var, stats[1])
    ref = adv.step_oracle(model, b1, fim_type, 7, offset)
    tot = sum(float(r.norm()) ** 2 for r in ref.values()) ** 0.5
    for k, r in ref.items():
        assert float((got[k].double() - r).norm()) <= TOL * max(float(r.norm()), 1e-6 * tot)
