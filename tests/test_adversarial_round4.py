"""Adversarial checks, fourth round: models and usage the other panels leave out, against the
float64 oracle of every step (tests/adversarial.py): EXACT, EMPIRICAL, MONTE_CARLO (the labels it
drew), HUTCHINSON and HUTCHINSON_DG (the probes they drew), with the object API and the seed API,
to 1e-10 relative per parameter tensor, the oracle nonzero for every tensor (or zero where the
model makes it so, checked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from adversarial import max_rel, nonzero, run, step_oracle
from cases import Fn
from torch.func import functional_call
from torch.nn.utils import parametrizations as pz

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
DT = torch.float64
N = 4


def _batches(k=2, shape=(5,), classes=4, n=N, seed=1, ids=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = (torch.randint(0, ids, (n, *shape), generator=g) if ids
             else torch.randn(n, *shape, generator=g, dtype=DT))
        out.append((x, torch.randint(0, classes, (n,), generator=g)))
    return out


def _check(make, batches, fim_type, zero=(), **kw):
    """The estimator of ``fim_type`` after ``batches`` equals the oracle; every tensor of the
    oracle is nonzero but those named in ``zero`` (which must be zero)."""
    est, ref = run(make(), batches, fim_type, **kw)
    assert all(float(ref[k].abs().max()) < 1e-25 for k in zero)
    assert nonzero({k: v for k, v in ref.items() if k not in zero})
    err = max_rel(est, ref)
    assert err < 1e-10, err
    return est


def _seed_api(make, batches, fim_type, **opts):
    """The seed API over ``batches`` on a fresh model against the oracle of its steps."""
    model = make()
    fimfast.zero_diag_fim(model, fim_type)
    ref: dict = {}
    for b in batches:
        est = fimfast.get_estimator(model, fim_type)
        offset = 0 if est is None else est.offset
        fimfast.diag_fim_step(model, b, fim_type, {"seed": 5, **opts})
        for n, v in step_oracle(model, b, fim_type, 5, offset, opts.get("num_probes", 1)).items():
            ref[n] = ref[n] + v if n in ref else v
    got = fimfast.get_diag_fim(model, fim_type)
    assert nonzero(ref)
    for n, r in ref.items():
        assert float((got[n].double() - r).norm() / r.norm()) < 1e-10, n


# -- every weight computed from parameters, nothing else trainable -------------------------- #
# before: the per-sample engine ran its fast path only when a plain layer group existed, so a
# model whose every trainable parameter reaches the logits through a computed weight (weight_norm
# or spectral_norm on every bias-free layer, a cosine head alone, torch.func.functional_call with
# fast weights) got an all-zero EXACT, EMPIRICAL and MONTE_CARLO diagonal (relative error 1.0)
def _normed(kind):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(),
                          nn.Linear(6, 4, bias=False)).to(DT)
        getattr(pz, kind)(m[0])
        getattr(pz, kind)(m[2])
        return m
    return make


class _StdConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _std_cosine():
    torch.manual_seed(0)
    head = Fn(lambda s, x: 4 * F.linear(x, F.normalize(s.w, dim=1)),
              w=nn.Parameter(torch.randn(3, 27)))
    return nn.Sequential(_StdConv(2, 3, 3, bias=False), nn.Tanh(), nn.Flatten(), head).to(DT)


class _Fast(nn.Module):
    """``functional_call`` of an MLP with fast weights ``f(p)`` for every parameter (MAML)."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.f = f
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)

    def forward(self, x):
        fast = {n: self.f(p) for n, p in self.net.named_parameters()}
        return functional_call(self.net, fast, (x,))


class _TokNormed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(7, 5)
        self.a, self.o = nn.Linear(5, 5, bias=False), nn.Linear(5, 4, bias=False)
        self.to(DT)
        pz.weight_norm(self.a)
        pz.weight_norm(self.o)
        self.e.requires_grad_(False)

    def forward(self, ids):
        return self.o(torch.tanh(self.a(self.e(ids))))


def _token_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 7, (3, 4), generator=g)
        lab = torch.randint(0, 4, (3, 4), generator=g)
        lab[0, 1] = -100
        out.append((ids, lab))
    return out


COMPUTED_ONLY = {
    "weight_norm on every bias-free layer": (_normed("weight_norm"), _batches(), {}),
    "spectral_norm on every bias-free layer": (_normed("spectral_norm"), _batches(), {}),
    "standardized conv and cosine head": (_std_cosine, _batches(shape=(2, 5, 5), classes=3), {}),
    "standardized conv, one column per chunk": (_std_cosine, _batches(shape=(2, 5, 5),
                                                                      classes=3),
                                                {"class_chunk": 1}),
    "functional_call fast weights 2p": (lambda: _Fast(lambda p: 2 * p), _batches(), {}),
    "functional_call fast weights p - 0.1 sin p": (lambda: _Fast(lambda p: p - 0.1 * p.sin()),
                                                   _batches(), {}),
    "token logits, weight_norm only": (_TokNormed, _token_batches(), {"class_dim": -1}),
}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", list(COMPUTED_ONLY))
def test_every_parameter_through_a_computed_weight(name, fim_type):
    make, batches, kw = COMPUTED_ONLY[name]
    _check(make, batches, fim_type, **kw)


@pytest.mark.parametrize("fim_type", ["exact", "empirical", "monte_carlo"])
def test_every_parameter_through_a_computed_weight_seed_api(fim_type):
    _seed_api(_normed("weight_norm"), _batches(3), fim_type)
