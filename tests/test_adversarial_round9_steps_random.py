"""Adversarial checks, ninth round: random changes between steps, each step against a new
estimator.

Each case draws, from its seed, a sequence of changes made to the model between its steps (train
and eval modes of the model or of one module, a BatchNorm's running statistics removed or put
back, its ``momentum``, a norm's ``eps``, dropout's ``p``, forward hooks and pre-hooks added and
removed, a Linear's class swapped for a subclass with its own forward and back, a new Parameter
object, an optimizer-like in-place update, an instance ``forward`` set and removed, a
convolution's dilation, an attention's dropout) and batch sizes; every step's increment of the
estimator that lived through them must equal the step of a new estimator made on the model as it
is then (same seed and offset, same random state): what a cache kept from an earlier step must
not change a later step's number. The seeds are ones on which the older engine was off (the
class swap, the running statistics removed in eval mode).
"""

from __future__ import annotations

import random
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

DT = torch.float64

N_STEPS = 6


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.gn = nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)
        self.o = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        return self.o(torch.tanh(self.gn(self.c2(h))).mean((2, 3)))


class _Att(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Linear(3, 4)
        self.m = nn.MultiheadAttention(4, 2, batch_first=True)
        self.n, self.o = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.p(x)
        return self.o(self.n(self.m(h, h, h, need_weights=False)[0]).mean(1))


class _Rec(nn.Module):
    def __init__(self):
        super().__init__()
        self.r, self.bn, self.o = nn.GRU(3, 4, batch_first=True), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.o(self.bn(self.r(x)[0][:, -1]))


MODELS = {"mlp": (_mlp, (4,)), "cnn": (_CNN, (2, 5, 5)), "att": (_Att, (3, 3)),
          "rec": (_Rec, (3, 3))}


def _of(m, cls) -> list:
    return [x for x in m.modules() if isinstance(x, cls)]


def _stats_toggled(bn) -> None:
    if bn.running_mean is None:
        bn.running_mean = torch.zeros(bn.num_features, dtype=DT)
        bn.running_var = torch.ones(bn.num_features, dtype=DT)
        bn.track_running_stats = True
    else:
        bn.running_mean = bn.running_var = None
        bn.track_running_stats = False


def _hook_added(rnd, subs, hooks) -> None:
    t = rnd.choice(subs)
    if rnd.random() < 0.5:
        hooks.append(t.register_forward_hook(
            lambda mod, i, o: o * 1.5 + 0.1 if isinstance(o, torch.Tensor) else None))
    else:
        hooks.append(t.register_forward_pre_hook(
            lambda mod, a: (a[0] * 0.7, *a[1:]) if isinstance(a[0], torch.Tensor) else None))


def _hook_removed(rnd, hooks) -> None:
    if hooks:
        hooks.pop(rnd.randrange(len(hooks))).remove()


def _swapped(rnd, lins) -> None:
    lin = rnd.choice(lins)
    lin.__class__ = nn.Linear if type(lin) is _DoubledLinear else _DoubledLinear


def _new_param(rnd, lins) -> None:
    lin = rnd.choice(lins)
    lin.weight = nn.Parameter(torch.randn_like(lin.weight) * 0.5)


def _updated(m) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _instance_forward(rnd, lins) -> None:
    lin = rnd.choice(lins)
    if "forward" in lin.__dict__:
        del lin.__dict__["forward"]
    else:
        lin.forward = types.MethodType(
            lambda self, x: F.linear(x, self.weight * 1.5, self.bias), lin)


def _changes(m, rnd, hooks) -> list:
    subs = [x for x in m.modules() if x is not m]
    lins = _of(m, nn.Linear)
    out = [
        lambda: m.train(not m.training),
        lambda: (lambda s: s.train(not s.training))(rnd.choice(subs)),
        lambda: _hook_added(rnd, subs, hooks),
        lambda: _hook_removed(rnd, hooks),
        lambda: _swapped(rnd, lins),
        lambda: _new_param(rnd, lins),
        lambda: _updated(m),
        lambda: _instance_forward(rnd, lins),
    ]
    for bn in _of(m, nn.modules.batchnorm._BatchNorm):
        out.append(lambda bn=bn: _stats_toggled(bn))
        out.append(lambda bn=bn: setattr(bn, "momentum", None if bn.momentum else 0.1))
    for n in _of(m, (nn.LayerNorm, nn.GroupNorm)):
        out.append(lambda n=n: setattr(n, "eps", rnd.choice([1e-5, 0.3, 1.0])))
    for d in _of(m, nn.Dropout):
        out.append(lambda d=d: setattr(d, "p", rnd.choice([0.0, 0.2, 0.6])))
    for c in _of(m, nn.Conv2d):
        out.append(lambda c=c: setattr(c, "dilation", (rnd.choice([1, 2]),) * 2))
    for a in _of(m, nn.MultiheadAttention):
        out.append(lambda a=a: setattr(a, "dropout", rnd.choice([0.0, 0.3])))
    return out


def _batch(seed: int, i: int, n: int, shape: tuple) -> tuple:
    g = torch.Generator().manual_seed(seed * 100 + i)
    return (torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))


def _fresh(m, fim_type: str, offset: int, b) -> dict | Exception:
    """The step of a new estimator (the random state put back afterwards)."""
    state = torch.get_rng_state()
    try:
        est = fimfast.DiagFisher(m, fim_type, seed=7)
        est.offset = offset
        est.step(b)
        return dict(est.result().items())
    except Exception as exc:  # noqa: BLE001 - compared with the estimator's own refusal
        return exc
    finally:
        torch.set_rng_state(state)


def _worst(est, before: dict | None, ref: dict) -> float:
    """The largest relative difference per parameter tensor (against at least 1e-9 of the
    whole step's norm: a bias below a BatchNorm gets rounding errors only)."""
    now = dict(est.result().items())
    floor = 1e-9 * sum(float(r.norm()) ** 2 for r in ref.values()) ** 0.5
    worst = 0.0
    for k, r in ref.items():
        inc = now[k] - before[k] if before else now[k]
        worst = max(worst, float((inc - r).norm()) / max(float(r.norm()), floor, 1e-30))
    return worst


def run(mname: str, fim_type: str, seed: int) -> float:
    """The largest relative difference between a step's increment and a new estimator's step,
    over the steps of case ``(mname, seed)``."""
    rnd = random.Random(seed)
    build, shape = MODELS[mname]
    torch.manual_seed(seed)
    m = build().double()
    est = fimfast.DiagFisher(m, fim_type, seed=7)
    hooks: list = []
    worst = 0.0
    for i in range(N_STEPS):
        for _ in range(rnd.choice([1, 1, 2]) if i else 0):
            rnd.choice(_changes(m, rnd, hooks))()
        b = _batch(seed, i, rnd.choice([4, 4, 4, 3, 6]), shape)
        before = dict(est.result().items()) if i else None
        ref = _fresh(m, fim_type, est.offset, b)
        if isinstance(ref, Exception):
            with pytest.raises(type(ref)):
                est.step(b)
            continue
        est.step(b)
        worst = max(worst, _worst(est, before, ref))
    return worst


CASES = [("mlp", 0), ("mlp", 2), ("cnn", 1), ("att", 0), ("rec", 2), ("rec", 5)]


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo", "hutchinson"])
@pytest.mark.parametrize("mname,seed", CASES)
def test_random_changes_between_steps_against_a_new_estimator(mname, seed, fim_type):
    assert run(mname, fim_type, seed) < 1e-9
