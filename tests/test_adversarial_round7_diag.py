"""Adversarial checks, seventh round, diagonal estimators: weights computed by parametrizations
that change with every computation, and lookup tables the HUTCHINSON family runs sparse.

* ``parametrizations.spectral_norm`` in training mode runs a power iteration each time its
  weight is computed; a dropout of the weight (a weight-dropped LSTM) draws a new mask. The
  per-sample types compute a parametrized tensor once per forward
  (``parametrize.cached``); a forward that reads it several times (a module called twice, a
  weight read again by ``F.linear``, torch's RNN/LSTM/GRU, the cells, ``nn.MultiheadAttention``)
  computes it several times: those steps are refused, naming the tensor, the state and the random
  stream kept; the same models are exact in eval mode, with the forward wrapped in
  ``parametrize.cached()``, and under the HUTCHINSON family (which runs the model's own forward);
  read once, every type is exact in training mode.
* The HUTCHINSON family's sparse lookups (tables of 1024 rows or more) must not read a
  parametrized table outside the forward (a read runs ``spectral_norm``'s power iteration once
  more), and must leave ``scale_grad_by_freq`` tables dense (torch has no sparse backward for
  them).

Every answer against the float64 oracle of tests/adversarial.py and tests/adversarial_bounds.py
(relative error per parameter tensor below 1e-10, the oracle nonzero). The wider panels of this
round (parametrizations, layers, lookups, recurrent layers) are in
tests/test_adversarial_round7_panel.py.
"""

from __future__ import annotations

import adversarial as adv
import adversarial_bounds as ab
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cases import Fn
from torch.nn.utils import parametrizations as PZ
from torch.nn.utils import parametrize as P

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

DT = torch.float64
PER_SAMPLE = ["exact", "empirical", "monte_carlo"]
RANDOM = ["hutchinson", "hutchinson_sqrt", "hutchinson_dg", "hutchinson_rankk",
          "hutchinson_rank1"]


def _batches(shape=(5,), k=2, ids=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = (torch.randint(0, ids, (4, *shape), generator=g) if ids
             else torch.randn(4, *shape, generator=g, dtype=DT))
        out.append((x, torch.randint(0, 4, (4,), generator=g)))
    return out


def check(make, batches, fim_type, zero=(), **kw):
    """The estimator after ``batches`` against the float64 oracle of its steps; the parameters
    of ``zero`` (by name) have a zero Fisher (to rounding) in both, every other one is nonzero."""
    if fim_type == "hutchinson_rankk":
        kw.setdefault("top_k", 2)
    runner = adv if fim_type in PER_SAMPLE else ab
    est, ref = runner.run(make(), batches, fim_type, **kw)
    got = dict(est.result().items())
    for n in zero:
        assert float(ref.pop(n).abs().max()) < 1e-25 and float(got[n].abs().max()) < 1e-25
    assert adv.nonzero(ref)
    err = ab.max_rel(est, ref)
    assert err < 1e-10, (fim_type, err)


# -- spectral_norm in training mode, its weight read several times ------------------------- #
class _WeightDrop(nn.Module):
    """A dropout of the weight (a weight-dropped LSTM): a new mask at each computation."""

    def forward(self, W):
        return F.dropout(W, 0.3, self.training)


def _sn(fwd, target, cached=False, drop=False, **mods):
    def make():
        torch.manual_seed(0)
        m = Fn((lambda s, x: _in_cache(fwd, s, x)) if cached else fwd,
               **{k: v() for k, v in mods.items()}).to(DT)
        if drop:
            P.register_parametrization(getattr(m, target[0]), target[1], _WeightDrop())
        else:
            PZ.spectral_norm(getattr(m, target[0]), name=target[1])
        return m
    return make


def _in_cache(fwd, s, x):
    with P.cached():
        return fwd(s, x)


def _lstm(s, x):
    return s.o(s.r(x)[0][:, -1])


def _cell(s, x):
    return s.o(s.r(x[:, 1], s.r(x[:, 0])))


def _mha(s, x):
    return s.o(s.a(x, x, x, need_weights=False)[0].mean(1))


def _two_blocks(s, x):
    with P.cached():
        h = torch.tanh(s.l(x))
    with P.cached():  # torch's cache is emptied between the blocks: computed again
        return s.o(torch.tanh(s.l(h)))


def _outside_and_in_a_block(s, x):
    h = torch.tanh(s.l(x))
    with P.cached():
        return s.o(torch.tanh(s.l(torch.tanh(s.l(h)))))


LIN = {"l": lambda: nn.Linear(5, 5), "o": lambda: nn.Linear(5, 4)}
SEQ = _batches((3, 5))
SEVERAL = {  # name: (forward, (module, tensor), modules, batches)
    "two parametrize.cached blocks": (_two_blocks, ("l", "weight"), LIN, _batches()),
    "read outside and inside a cached block": (_outside_and_in_a_block, ("l", "weight"), LIN,
                                               _batches()),
    "Linear called twice": (lambda s, x: s.o(torch.tanh(s.l(torch.tanh(s.l(x))))),
                            ("l", "weight"),
                            {"l": lambda: nn.Linear(5, 5), "o": lambda: nn.Linear(5, 4)},
                            _batches()),
    "weight read again by F.linear": (
        lambda s, x: s.o(torch.tanh(s.l(x)) + torch.tanh(F.linear(x.flip(1), s.l.weight))),
        ("l", "weight"), {"l": lambda: nn.Linear(5, 5), "o": lambda: nn.Linear(5, 4)},
        _batches()),
    "Conv1d called twice": (lambda s, x: s.o(torch.tanh(s.c(torch.tanh(s.c(x)))).flatten(1)),
                            ("c", "weight"),
                            {"c": lambda: nn.Conv1d(3, 3, 3, padding=1),
                             "o": lambda: nn.Linear(15, 4)}, SEQ),
    "Bilinear called twice": (lambda s, x: s.o(s.b(torch.tanh(s.b(x, x)), x)), ("b", "weight"),
                              {"b": lambda: nn.Bilinear(5, 5, 5), "o": lambda: nn.Linear(5, 4)},
                              _batches()),
    "LSTM weight_hh_l0": (_lstm, ("r", "weight_hh_l0"),
                          {"r": lambda: nn.LSTM(5, 3, batch_first=True),
                           "o": lambda: nn.Linear(3, 4)}, SEQ),
    "GRU weight_ih_l0": (_lstm, ("r", "weight_ih_l0"),
                         {"r": lambda: nn.GRU(5, 3, batch_first=True),
                          "o": lambda: nn.Linear(3, 4)}, SEQ),
    "GRUCell weight_hh": (_cell, ("r", "weight_hh"),
                          {"r": lambda: nn.GRUCell(5, 3), "o": lambda: nn.Linear(3, 4)}, SEQ),
    "MultiheadAttention in_proj_weight": (
        _mha, ("a", "in_proj_weight"),
        {"a": lambda: nn.MultiheadAttention(5, 1, batch_first=True),
         "o": lambda: nn.Linear(5, 4)}, SEQ),
}
DROPPED = {  # the weight dropped (a mask drawn at each computation) instead of spectral_norm
    f"weight dropout, {n}": (*SEVERAL[n], True)
    for n in ("Linear called twice", "LSTM weight_hh_l0", "GRUCell weight_hh",
              "two parametrize.cached blocks")}
SEVERAL = {**SEVERAL, **DROPPED}


@pytest.mark.parametrize("fim_type", PER_SAMPLE)
@pytest.mark.parametrize("name", list(SEVERAL))
def test_spectral_norm_train_read_several_times_is_refused_state_kept(name, fim_type):
    fwd, target, mods, batches, *drop = SEVERAL[name]
    model = _sn(fwd, target, drop=bool(drop), **mods)()
    est = fimfast.DiagFisher(model, fim_type, seed=3)
    bufs = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    with pytest.raises(fimfast.UnsupportedModelError, match=f"{target[0]}.{target[1]} .*eval"):
        est.step(batches[0])
    assert est.offset == 0 and est.state.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    assert drop or torch.equal(rng, torch.get_rng_state())  # (a forward drawing masks moves it)
    model.eval()  # no power iteration: the same estimator steps, exactly
    est.step(batches[1])
    ref = adv.step_oracle(model, batches[1], fim_type, 3, 0)
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10


@pytest.mark.parametrize("name", list(SEVERAL))
def test_spectral_norm_read_several_times_exact_where_computed_as_the_step_does(name):
    """Eval mode (no power iteration), the forward wrapped in ``parametrize.cached()`` (the
    model computes the weight once too): every type exact; training mode, the HUTCHINSON family
    (the model's own forward)."""
    fwd, target, mods, batches, *drop = SEVERAL[name]
    i, kw = list(SEVERAL).index(name), {"drop": bool(drop), **mods}
    for k, fim_type in enumerate(PER_SAMPLE):  # each type in turn, over the models
        if (i + k) % 3 != 2:
            check(lambda: _sn(fwd, target, **kw)().eval(), batches, fim_type)
        if (i + k) % 3 != 0:
            check(_sn(fwd, target, cached=True, **kw), batches, fim_type)
    for fim_type in (RANDOM[i % 5], RANDOM[(i + 2) % 5]):
        check(_sn(fwd, target, **kw), batches, fim_type)
    check(lambda: _sn(fwd, target, **kw)().eval(), batches, RANDOM[(i + 1) % 5])


@pytest.mark.parametrize("drop", [False, True], ids=["spectral_norm", "weight dropout"])
def test_changing_weight_read_once_stays_exact_in_training_mode(drop):
    fwd = lambda s, x: s.o(s.d(torch.tanh(s.l(x))))  # noqa: E731 - a dropout after it too
    mods = {"l": lambda: nn.Linear(5, 6), "d": lambda: nn.Dropout(0.2),
            "o": lambda: nn.Linear(6, 4)}
    for fim_type in PER_SAMPLE + RANDOM:
        check(_sn(fwd, ("l", "weight"), drop=drop, **mods), _batches(), fim_type)


# -- the HUTCHINSON family's sparse lookups -------------------------------------------------- #
def _big_ids():
    out = _batches((5,), ids=1100, seed=2)
    for x, _ in out:
        x[0, :2] = 7  # a row looked up twice in a sample, and by another sample
        x[1, 0] = 7
    return out


def _table(spectral=False, **kw):
    def make():
        torch.manual_seed(0)
        m = Fn(lambda s, x: s.o(torch.tanh(s.e(x)).mean(1)), e=nn.Embedding(1100, 3, **kw),
               o=nn.Linear(3, 4)).to(DT)
        if spectral:
            PZ.spectral_norm(m.e)
        return m
    return make


def _bag(**kw):
    def make():
        torch.manual_seed(0)
        return Fn(lambda s, x: s.o(torch.tanh(s.e(x))), e=nn.EmbeddingBag(1100, 3, **kw),
                  o=nn.Linear(3, 4)).to(DT)
    return make


@pytest.mark.parametrize("fim_type", RANDOM)
def test_large_spectral_normed_table_is_not_computed_outside_the_forward(fim_type):
    model = _table(spectral=True)()
    u = model.e.parametrizations.weight[0]._u.clone()
    check(_table(spectral=True), _big_ids(), fim_type)
    fimfast.DiagFisher(model, fim_type).step(_big_ids()[0])
    assert torch.equal(u, model.e.parametrizations.weight[0]._u)  # a step is a measurement


@pytest.mark.parametrize("fim_type", RANDOM)
@pytest.mark.parametrize("make", [_table(scale_grad_by_freq=True),
                                  _table(scale_grad_by_freq=True, padding_idx=7),
                                  _bag(mode="mean", scale_grad_by_freq=True)],
                         ids=["Embedding", "Embedding padding_idx", "EmbeddingBag mean"])
def test_large_table_scaled_by_frequency_keeps_the_dense_backward(make, fim_type):
    check(make, _big_ids(), fim_type)


# -- the per-sample engine's check of a shared lookup, with spectral_norm elsewhere ------------ #
class _Positions(nn.Module):
    """Token and position embeddings (the positions ``arange(T)``: a lookup shared by the batch,
    which the engine expands once checked against the model's own forward), then a
    spectral-normed Linear in training mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(9, 5), nn.Embedding(6, 5)
        self.l, self.o = PZ.spectral_norm(nn.Linear(5, 5)), nn.Linear(5, 4)
        self.to(DT)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.o(torch.tanh(self.l(h)).mean(1))


@pytest.mark.parametrize("fim_type", PER_SAMPLE)
def test_shared_lookup_check_runs_from_the_buffers_of_the_step(fim_type, caplog):
    """The check's second forward starts from the buffers the step's forward started from
    (spectral_norm's ``_u``, ``_v`` included): it agrees, the lookup stays expanded, and the
    step is the model's (it ran from buffers moved on twice: 5e-5 to 1.3e-4 off)."""
    with caplog.at_level("INFO", logger="fimfast.persample"):
        check(_Positions, _batches((5,), ids=9), fim_type)
    assert "without expanding" not in caplog.text


class _Carried(nn.Module):
    """Positions ``arange(T)`` and a GRUCell looped over the tokens from a state carried from
    one forward to the next in an attribute (not a buffer: no step can put it back)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(9, 3), nn.Embedding(6, 3)
        self.cell, self.o = nn.GRUCell(3, 4), nn.Linear(4, 4)
        self.h = None
        self.to(DT)

    def forward(self, x):
        e = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        h = self.h
        for t in range(x.shape[1]):
            h = self.cell(e[:, t], h)
        self.h = h.detach()
        return self.o(h)


def _carried_oracle(model, batch, fim_type, offset):
    h = model.h
    ref = (adv if fim_type in PER_SAMPLE else ab).step_oracle(model, batch, fim_type, 7, offset)
    model.h = h
    return ref


@pytest.mark.parametrize("fim_type", PER_SAMPLE)
def test_state_carried_in_an_attribute_with_a_checked_lookup(fim_type):
    """The check of the ``(T,)`` lookup runs the forward again, from a carried state moved on:
    its logits differ, and the step taken once more (from a state moved on twice) was 5.6% off.
    Refused, naming the cause; the next step (no check, one forward) is the model's."""
    B = _batches((5,), ids=9)
    model = _Carried()
    est = fimfast.DiagFisher(model, fim_type, seed=7)
    with pytest.raises(fimfast.UnsupportedModelError, match="attributes across calls"):
        est.step(B[0])
    assert est.state.steps == 0 and est.offset == 0
    ref = _carried_oracle(model, B[1], fim_type, 0)
    est.step(B[1])
    assert adv.nonzero(ref) and ab.max_rel(est, ref) < 1e-10


@pytest.mark.parametrize("fim_type", RANDOM[:2])
def test_state_carried_in_an_attribute_hutchinson_is_the_models(fim_type):
    B = _batches((5,), ids=9)
    model = _Carried()
    est = fimfast.DiagFisher(model, fim_type, seed=7)
    total = {}
    for b in B:
        ref = _carried_oracle(model, b, fim_type, est.offset)
        est.step(b)
        total = {n: total.get(n, 0) + v for n, v in ref.items()}
    assert adv.nonzero(total) and ab.max_rel(est, total) < 1e-10


# -- the HUTCHINSON family's lean self-attention, an output projection parametrized ----------- #
def _attention(block):
    def make():
        torch.manual_seed(0)
        if block:
            a = nn.TransformerEncoderLayer(5, 1, 8, dropout=0.0, batch_first=True)
            PZ.spectral_norm(a.linear1)
            PZ.spectral_norm(a.self_attn.out_proj)
            return Fn(lambda s, x: s.o(s.a(x).mean(1)), a=a, o=nn.Linear(5, 4)).to(DT)
        m = Fn(_mha, a=nn.MultiheadAttention(5, 1, batch_first=True), o=nn.Linear(5, 4)).to(DT)
        PZ.spectral_norm(m.a.out_proj)
        return m
    return make


@pytest.mark.parametrize("fim_type", RANDOM)
@pytest.mark.parametrize("block", [False, True], ids=["MultiheadAttention", "encoder layer"])
def test_spectral_normed_out_proj_is_computed_as_torch_computes_it(block, fim_type):
    """The lean self-attention read ``out_proj.weight`` in its applicability check and again in
    its forward: a second power iteration (1e-7 to 1.6e-6 off); a parametrized projection runs
    torch's forward."""
    check(_attention(block), SEQ, fim_type)
