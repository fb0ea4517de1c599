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
from adversarial_models5 import _batches
from cases import Fn
from torch.func import functional_call
from torch.nn.utils import parametrizations as pz

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]
DT = torch.float64
N = 4


def _check(make, batches, fim_type, zero=(), **kw):
    """The estimator of ``fim_type`` after ``batches`` equals the oracle; every tensor of the
    oracle is nonzero but those named in ``zero``, which both must give as zero (to rounding:
    compared absolutely, as their relative error is one of rounding errors)."""
    est, ref = run(make(), batches, fim_type, **kw)
    assert all(float(ref[k].abs().max()) < 1e-25 for k in zero)
    kept = {k: v for k, v in ref.items() if k not in zero}
    assert nonzero(kept)
    got = dict(est.result().items())
    assert all(float(got[k].abs().max()) < 1e-25 for k in zero)  # zero to rounding
    err = max_rel(est, kept)
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


# -- non-finite logits in the rows left out of the Fisher ------------------------------------ #
class _Padded(nn.Module):
    """Token logits through an attention whose masked query rows (``mask`` 0 at a query: a
    padded position of a sliding-window or per-sample mask, as Mistral's eager attention with
    padding) see no key: their softmax, and so their logits, are NaN. ``fill`` instead writes
    -inf into the logits of the padded positions only (a finite Fisher: nothing upstream is
    NaN)."""

    def __init__(self, fill=False):
        super().__init__()
        torch.manual_seed(0)
        self.fill = fill
        self.e = nn.Embedding(7, 4)
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 5)
        self.to(DT)

    def forward(self, ids, mask=None):
        h = self.e(ids)
        T = ids.shape[1]
        pad = (ids == 0) if mask is None else mask == 0
        allowed = ~pad[:, :, None] & ~pad[:, None, :] & torch.ones(T, T, dtype=torch.bool).tril()
        if self.fill:
            allowed = allowed | torch.eye(T, dtype=torch.bool)
        s = (self.q(h) @ self.k(h).transpose(1, 2)).masked_fill(~allowed, float("-inf"))
        z = self.lm_head(h + torch.softmax(s, -1) @ h)
        return z.masked_fill(pad[..., None], float("-inf")) if self.fill else z


def _padded_batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for k in range(3):
        ids = torch.randint(1, 7, (3, 4), generator=g)
        lab = torch.randint(0, 5, (3, 4), generator=g)
        if k == 1:  # the one with padding
            ids[1, 2:] = 0
            lab[1, 2:] = -100
        out.append((ids, lab))
    return out


@pytest.mark.parametrize("fim_type", TYPES)
def test_nan_from_left_out_rows_is_refused_and_state_kept(fim_type):
    # before: the step was taken (only the valid rows' logits are checked) and the state held NaN
    # for every parameter upstream of the attention from then on
    B = _padded_batches()
    model = _Padded()
    assert bool(model(B[1][0]).isnan().any()) and not bool(model(B[0][0]).isnan().any())
    est = fimfast.DiagFisher(model, fim_type, seed=3, class_dim=-1)
    est.step(B[0])
    before, offset = {k: v.clone() for k, v in est.result().items()}, est.offset
    with pytest.raises(ValueError, match="left out of the Fisher.*non-finite logit"):
        est.step(B[1])
    assert est.offset == offset
    assert all(torch.equal(before[k], v) for k, v in est.result().items())
    est.step(B[2])  # the estimator goes on
    assert all(bool(torch.isfinite(v).all()) for _, v in est.result().items())
    fimfast.zero_diag_fim(model)
    fimfast.diag_fim_step(model, B[0], fim_type, {"seed": 3, "class_dim": -1})
    with pytest.raises(ValueError, match="left out of the Fisher"):
        fimfast.diag_fim_step(model, B[1], fim_type, {"seed": 3, "class_dim": -1})
    got = fimfast.get_diag_fim(model, fim_type)
    assert all(torch.equal(before[k], got[k]) for k in before)


@pytest.mark.parametrize("fim_type", ["hutchinson", "hutchinson_dg"])
def test_nan_from_left_out_rows_through_lm_head_is_refused(fim_type):
    B = _padded_batches()
    est = fimfast.DiagFisher(_Padded(), fim_type, seed=3, class_dim=-1, lm_head="lm_head")
    est.step(B[0])
    before = {k: v.clone() for k, v in est.result().items()}
    with pytest.raises(ValueError, match="left out of the Fisher.*lm_head input"):
        est.step(B[1])
    assert all(torch.equal(before[k], v) for k, v in est.result().items())


@pytest.mark.parametrize("fim_type", TYPES)
def test_minus_inf_written_into_left_out_rows_only_is_exact(fim_type):
    """-inf in the logits of padded rows, nothing upstream non-finite: a finite Fisher, taken."""
    _check(lambda: _Padded(fill=True), _padded_batches(), fim_type, zero=("k.bias",), class_dim=-1)


# -- a recurrent layer's outputs written in place by the forward ----------------------------- #
class _RnnInPlace(nn.Module):
    """``out, h_n = rnn(x)`` then ``out.add_(...)`` / ``out.tanh_()`` (allowed by torch's
    layer): the unrolled steps (an LSTM with ``proj_size``) and the fused
    node (fimfast/rules/recurrent_scan.py)."""

    def __init__(self, kind, op, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.op = op
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](3, 4, batch_first=True,
                                                                           **kw)
        self.head = nn.Linear(kw.get("proj_size") or 4, 3)
        self.to(DT)

    def forward(self, x):
        out, _ = self.rnn(x)
        if self.op == "add_":
            out.add_(torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype))
        else:
            out.tanh_()
        return self.head(out.mean(1))


RNN_IN_PLACE = {
    "lstm proj_size add_": ("lstm", "add_", {"proj_size": 2}),
    "lstm proj_size two layers tanh_": ("lstm", "tanh_", {"proj_size": 2, "num_layers": 2}),
    "gru add_": ("gru", "add_", {}),
    "lstm tanh_": ("lstm", "tanh_", {}),
    "rnn two layers add_": ("rnn", "add_", {"num_layers": 2}),
}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", list(RNN_IN_PLACE))
def test_recurrent_outputs_written_in_place(name, fim_type):
    # before: the per-sample rule kept the outputs it returned as the states each step started
    # from, so an LSTM with proj_size whose output the forward then modified in place got its
    # EXACT, EMPIRICAL and MONTE_CARLO diagonal from the modified states (relative error 4e2);
    # the fused node raised autograd's "modified by an inplace operation" instead
    kind, op, kw = RNN_IN_PLACE[name]
    _check(lambda: _RnnInPlace(kind, op, **kw), _batches(shape=(3, 3), classes=3), fim_type)


# -- observed targets of the bernoulli and gaussian likelihoods ------------------------------ #
@pytest.mark.parametrize("likelihood,bad", [("gaussian", float("nan")), ("gaussian", float("inf")),
                                            ("bernoulli", float("nan")), ("bernoulli", 2.0),
                                            ("bernoulli", -1.0)])
def test_empirical_targets_not_finite_or_not_probabilities_are_refused(likelihood, bad):
    # before: a NaN regression target (a missing value) made the EMPIRICAL diagonal of every
    # parameter NaN, kept in the state; bernoulli targets outside [0, 1] were taken as scores
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(4, 5, dtype=DT)
    good = torch.rand(4, 3, dtype=DT)
    worse = good.clone()
    worse[2, 1] = bad
    est = fimfast.DiagFisher(model, "empirical", likelihood=likelihood)
    est.step((x, good))
    before = {k: v.clone() for k, v in est.result().items()}
    with pytest.raises(ValueError, match="labels: "):
        est.step((x, worse))
    assert all(torch.equal(before[k], v) for k, v in est.result().items())
    fimfast.zero_diag_fim(model)
    with pytest.raises(ValueError, match="labels: "):
        fimfast.diag_fim_step(model, (x, worse), "empirical", {"likelihood": likelihood})
    for t in ("exact", "monte_carlo", "hutchinson"):  # the targets are not read: taken
        fimfast.DiagFisher(model, t, likelihood=likelihood).step((x, worse))


# -- found exact: kept as a panel ------------------------------------------------------------- #
def _at(step, change):
    def before(i, model):
        if i == step:
            change(model)
    return before


def _seq(*mods, train=False):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(*(m() for m in mods)).to(DT).train(train)
    return make


def _bn_eval():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4)).to(DT).eval()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
    return m


def _bn_moved(m):
    with torch.no_grad():
        m[1].running_mean.add_(1.0)
        m[1].running_var.mul_(3.0)


class _Latents(nn.Module):
    """A Linear on learned latents (no batch axis, ``L == N`` rows) attending over the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lat = nn.Parameter(torch.randn(N, 5))
        self.q, self.o = nn.Linear(5, 5), nn.Linear(5, 3)
        self.k = nn.Linear(5, 5, bias=False)
        self.to(DT)

    def forward(self, x):
        a = torch.softmax(torch.einsum("ld,ntd->nlt", self.q(self.lat), self.k(x)), -1)
        return self.o(torch.einsum("nlt,ntd->nld", a, x).mean(1))


def _fc_other(s, x):  # torch.func.functional_call with another module's parameters
    return functional_call(s.net, {"0.weight": s.other.weight, "0.bias": s.other.bias}, (x,)) \
        + s.net(x)


PANEL = {
    "BatchNorm eval, running statistics moved": (_bn_eval, _batches(3), _at(1, _bn_moved), {}),
    "LayerNorm eps changed": (_seq(lambda: nn.Linear(5, 6), lambda: nn.LayerNorm(6),
                                   nn.Tanh, lambda: nn.Linear(6, 4)), _batches(3),
                              _at(1, lambda m: setattr(m[1], "eps", 0.7)), {}),
    "conv padding_mode changed": (_seq(lambda: nn.Conv2d(2, 3, 3, padding=1), nn.Tanh,
                                       nn.Flatten, lambda: nn.Linear(75, 3)),
                                  _batches(3, (2, 5, 5), 3),
                                  _at(1, lambda m: setattr(m[0], "padding_mode", "circular")), {}),
    "forward hook prepended later": (_seq(lambda: nn.Linear(5, 6), nn.Tanh,
                                          lambda: nn.Linear(6, 4)), _batches(3),
                                     _at(1, lambda m: m[0].register_forward_hook(
                                         lambda mod, a, out: out * 2 + 1, prepend=True)), {}),
    "learned latents, L == N": (_Latents, _batches(shape=(3, 5), classes=3), None, {}),
    "functional_call with another module's weights": (lambda: Fn(
        _fc_other, net=nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT),
        other=nn.Linear(5, 6).to(DT)), _batches(), None, {}),
    "channels_last convolutions": (lambda: _seq(lambda: nn.Conv2d(2, 3, 3), nn.Tanh,
                                                lambda: nn.Conv2d(3, 4, 2), nn.Flatten,
                                                lambda: nn.Linear(16, 3))().to(
        memory_format=torch.channels_last),
        [(x.to(memory_format=torch.channels_last), y)
         for x, y in _batches(shape=(2, 5, 5), classes=3)], None, {}),
    "EmbeddingBag include_last_offset, max": (lambda: Fn(
        lambda s, ids: s.o(torch.tanh(s.e(ids.reshape(-1), torch.arange(
            0, ids.numel() + 1, ids.shape[1])))),
        e=nn.EmbeddingBag(9, 4, mode="max", include_last_offset=True),
        o=nn.Linear(4, 3)).to(DT), _batches(shape=(4,), classes=3, ids=9), None, {}),
}


@pytest.mark.parametrize("fim_type", TYPES)
@pytest.mark.parametrize("name", list(PANEL))
def test_panel(name, fim_type):
    make, batches, before, kw = PANEL[name]
    est, ref = run(make(), batches, fim_type, before=before, **kw)
    assert nonzero(ref)
    assert max_rel(est, ref) < 1e-10
