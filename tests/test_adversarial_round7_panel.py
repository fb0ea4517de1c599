"""Adversarial checks, seventh round, diagonal estimators: the panel of models found exact, kept
against regressions. Weights through parametrizations (``weight_norm`` on a bias,
``orthogonal`` maps, several parametrizations chained, two originals, a shape-changing one, a
parametrized weight used twice under the model's own ``parametrize.cached()``) on convolutions,
embeddings, recurrent layers, cells, attention, norms and PReLU; low-rank adapters over a frozen
base and partly frozen models; layers (Bilinear on 3-D inputs, PReLU per channel, GLU,
GroupNorm and InstanceNorm with running statistics, LocalResponseNorm, RMSNorm, LayerNorm without
bias, convolutions with circular, reflect and replicate padding, ``padding="same"`` with
dilation, depthwise, transposed with ``output_padding``, dilation and groups, PixelShuffle,
Unfold, Fold, pooling); lookups (``padding_idx``, ``max_norm``, ``scale_grad_by_freq``,
``sparse=True``, bags with offsets, ``include_last_offset``, ``per_sample_weights``, empty bags);
recurrent layers (ReLU RNN, stacked with dropout, bidirectional, ``proj_size``, sequence-first,
initial states computed from the input, packed sequences of unsorted lengths, cells looped in
Python with a masked update).

Each model under EXACT and two more types cycled over the panel (every type of the diagonal
family in turn), against the float64 oracle of tests/adversarial.py and
tests/adversarial_bounds.py: relative error per parameter tensor below 1e-10, the oracle nonzero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from cases import Fn
from test_adversarial_round7_diag import DT, _batches, check
from torch.nn.utils import parametrizations as PZ
from torch.nn.utils import parametrize as P
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytestmark = pytest.mark.filterwarnings("ignore")

OTHERS = ["empirical", "monte_carlo", "hutchinson", "hutchinson_sqrt", "hutchinson_dg",
          "hutchinson_rankk", "hutchinson_rank1"]


def _m(fwd, after=None, **mods):
    def make():
        torch.manual_seed(0)
        m = Fn(fwd, **{k: v() for k, v in mods.items()}).to(DT)
        with torch.no_grad():  # norms' affine parameters off their initial 1 and 0
            for n, p in m.named_parameters():
                if p.dim() == 1 and n.endswith(("weight", "bias")):
                    p.add_(0.3 * torch.randn_like(p))
        if after is not None:
            after(m)
        return m
    return make


class _Twice(nn.Module):
    def forward(self, X):
        return 2.0 * X + X.sin()


class _Two(nn.Module):
    def forward(self, A, B):
        return A @ B

    def right_inverse(self, W):
        return W[:, :3].clone(), torch.eye(3, W.shape[1], dtype=W.dtype)


def _mlp(after):
    return _m(lambda s, x: s.b(torch.tanh(s.a(x))), after, a=lambda: nn.Linear(5, 6),
              b=lambda: nn.Linear(6, 4))


def _cached_reuse(s, x):
    with P.cached():
        return s.o(torch.tanh(s.l(torch.tanh(s.l(x)))))


def _lora(s, x):
    return s.o(torch.tanh(s.base(x) + 2.0 * s.B(s.A(s.drop(x)))))


def _lora_after(m):
    m.base.requires_grad_(False)
    with torch.no_grad():
        m.B.weight.normal_()


X5, IMG, SEQ, VOL = _batches(), _batches((4, 6, 6)), _batches((4, 7)), _batches((2, 4, 4, 4))
RNN = _batches((5, 3))


def _ids(pad=0):
    out = _batches((5,), ids=9)
    for x, _ in out:
        x[0, :2] = 3  # a row twice in a sample and in another sample
        x[1, 1] = 3
        x[2, -2:] = pad
    return out


IDS = _ids()

PARAMETRIZED = {
    # a 1-D weight_norm is g * sign(v): v's Fisher is 0
    "weight_norm of a bias": (_mlp(lambda m: PZ.weight_norm(m.a, name="bias", dim=0)), X5,
                              ("a.parametrizations.bias.original1",)),
    "orthogonal cayley": (_mlp(lambda m: PZ.orthogonal(m.a, orthogonal_map="cayley")), X5),
    "orthogonal householder": (_mlp(lambda m: PZ.orthogonal(m.a, orthogonal_map="householder")),
                               X5),
    "two parametrizations chained": (_mlp(lambda m: [P.register_parametrization(m.a, "weight",
                                                                                _Twice())
                                                     for _ in range(2)]), X5),
    "two originals": (_mlp(lambda m: P.register_parametrization(m.a, "weight", _Two())), X5),
    "weight_norm's originals partly frozen": (
        _mlp(lambda m: (PZ.weight_norm(m.a),
                        m.a.parametrizations.weight.original0.requires_grad_(False))), X5),
    "spectral_norm used twice under parametrize.cached": (
        _m(_cached_reuse, lambda m: PZ.spectral_norm(m.l), l=lambda: nn.Linear(5, 5),
           o=lambda: nn.Linear(5, 4)), X5),
    "only biases trained": (_mlp(lambda m: (m.a.weight.requires_grad_(False),
                                            m.b.weight.requires_grad_(False))), X5),
    "low-rank adapter, frozen base, dropout": (
        _m(_lora, _lora_after, base=lambda: nn.Linear(5, 6), A=lambda: nn.Linear(5, 2, bias=False),
           B=lambda: nn.Linear(2, 6, bias=False), drop=lambda: nn.Dropout(0.3),
           o=lambda: nn.Linear(6, 4)), X5),
    "weight_norm Conv1d dilated": (_m(lambda s, x: s.o(torch.tanh(s.c(x)).flatten(1)),
                                      lambda m: PZ.weight_norm(m.c),
                                      c=lambda: nn.Conv1d(4, 3, 3, padding=2, dilation=2),
                                      o=lambda: nn.Linear(21, 4)), SEQ),
    "orthogonal ConvTranspose1d": (_m(lambda s, x: s.o(torch.tanh(s.c(x)).flatten(1)),
                                      lambda m: PZ.orthogonal(m.c),
                                      c=lambda: nn.ConvTranspose1d(4, 3, 3, stride=2),
                                      o=lambda: nn.Linear(45, 4)), SEQ),
    "custom Embedding": (_m(lambda s, x: s.o(torch.tanh(s.e(x)).mean(1)),
                            lambda m: P.register_parametrization(m.e, "weight", _Twice()),
                            e=lambda: nn.Embedding(9, 5), o=lambda: nn.Linear(5, 4)), IDS),
    "weight_norm LSTM weight_hh_l0": (_m(lambda s, x: s.o(s.r(x)[0][:, -1]),
                                         lambda m: PZ.weight_norm(m.r, "weight_hh_l0"),
                                         r=lambda: nn.LSTM(3, 4, batch_first=True),
                                         o=lambda: nn.Linear(4, 4)), RNN),
    "old weight_norm GRUCell": (_m(lambda s, x: s.o(s.r(x[:, 1], s.r(x[:, 0]))),
                                   lambda m: torch.nn.utils.weight_norm(m.r, "weight_hh"),
                                   r=lambda: nn.GRUCell(3, 4), o=lambda: nn.Linear(4, 4)), RNN),
    "weight_norm MultiheadAttention in_proj_weight": (
        _m(lambda s, x: s.o(s.a(x, x, x, need_weights=False)[0].mean(1)),
           lambda m: PZ.weight_norm(m.a, "in_proj_weight"),
           a=lambda: nn.MultiheadAttention(3, 1, batch_first=True), o=lambda: nn.Linear(3, 4)),
        RNN),
    "custom Bilinear, PReLU, GroupNorm": (
        _m(lambda s, x: s.o(s.n(s.a(s.b(x, x.sin())).unsqueeze(-1)).flatten(1)),
           lambda m: [P.register_parametrization(mod, n, _Twice())
                      for mod, n in ((m.b, "weight"), (m.a, "weight"), (m.n, "bias"))],
           b=lambda: nn.Bilinear(5, 5, 6), a=lambda: nn.PReLU(6), n=lambda: nn.GroupNorm(2, 6),
           o=lambda: nn.Linear(6, 4)), X5),
}


def _conv(c, flat, x=SEQ, post=None):
    post = post or (lambda s, h: h)
    return (_m(lambda s, x: s.o(torch.tanh(post(s, s.c(x))).flatten(1)), c=c,
               o=lambda: nn.Linear(flat, 4)), x)


def _after_conv(mod, flat, c=lambda: nn.Conv2d(4, 3, 3)):
    return (_m(lambda s, x: s.o(s.p(torch.tanh(s.c(x))).flatten(1)), c=c, p=mod,
               o=lambda: nn.Linear(flat, 4)), IMG)


LAYERS = {
    "Bilinear on 3-D inputs": (_m(lambda s, x: s.o(torch.tanh(s.b(x, x.flip(1))).mean(1)),
                                  b=lambda: nn.Bilinear(7, 7, 3), o=lambda: nn.Linear(3, 4)),
                               SEQ),
    "PReLU per channel after Conv2d": _after_conv(lambda: nn.PReLU(3), 48),
    "PReLU reused": (_m(lambda s, x: s.o(s.a(s.l(s.a(x)))), l=lambda: nn.Linear(5, 5),
                        a=lambda: nn.PReLU(5), o=lambda: nn.Linear(5, 4)), X5),
    "GLU over channels": (_m(lambda s, x: s.o(F.glu(s.c(x), 1).flatten(1)),
                             c=lambda: nn.Conv2d(4, 4, 3), o=lambda: nn.Linear(32, 4)), IMG),
    "GroupNorm on (N, C)": (_m(lambda s, x: s.o(torch.tanh(s.n(s.l(x)))),
                               l=lambda: nn.Linear(5, 6), n=lambda: nn.GroupNorm(3, 6),
                               o=lambda: nn.Linear(6, 4)), X5),
    "InstanceNorm1d affine, running statistics": (
        _m(lambda s, x: s.o(torch.tanh(s.n(x)).flatten(1)),
           n=lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
           o=lambda: nn.Linear(28, 4)), SEQ),
    "InstanceNorm2d affine, running statistics": _after_conv(
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), 48),
    "LocalResponseNorm": _after_conv(lambda: nn.LocalResponseNorm(3), 80,
                                     lambda: nn.Conv2d(4, 5, 3)),
    "RMSNorm eps over two dims": (_m(lambda s, x: s.o(torch.tanh(s.n(x)).flatten(1)),
                                     n=lambda: nn.RMSNorm((4, 7), eps=0.5),
                                     o=lambda: nn.Linear(28, 4)), SEQ),
    "RMSNorm without affine": (_m(lambda s, x: s.o(torch.tanh(s.n(s.l(x)))),
                                  l=lambda: nn.Linear(5, 6),
                                  n=lambda: nn.RMSNorm(6, elementwise_affine=False),
                                  o=lambda: nn.Linear(6, 4)), X5),
    "LayerNorm without bias": (_m(lambda s, x: s.o(torch.tanh(s.n(x)).flatten(1)),
                                  n=lambda: nn.LayerNorm((4, 7), bias=False),
                                  o=lambda: nn.Linear(28, 4)), SEQ),
    **{f"Conv1d {mode}": _conv(lambda mode=mode: nn.Conv1d(4, 3, 3, padding=2,
                                                           padding_mode=mode), 27)
       for mode in ("circular", "reflect", "replicate")},
    **{f"Conv2d same dilated {mode}": _conv(
        lambda mode=mode: nn.Conv2d(4, 3, (3, 2), padding="same", dilation=2,
                                    padding_mode=mode), 108, IMG)
       for mode in ("circular", "reflect", "replicate")},
    "Conv3d replicate": _conv(lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate"),
                              192, VOL),
    "Conv1d same, even kernel, dilated": _conv(
        lambda: nn.Conv1d(4, 3, 4, padding="same", dilation=3, padding_mode="reflect"), 21),
    "depthwise Conv2d": _conv(lambda: nn.Conv2d(4, 8, 3, groups=4), 128, IMG),
    "ConvTranspose2d output_padding, dilation, groups": _conv(
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, dilation=2, groups=2,
                                   padding=1), 6 * 14 * 14, IMG),
    "ConvTranspose3d groups": _conv(lambda: nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2,
                                                               output_padding=1, dilation=2),
                                    4000, VOL),
    "PixelShuffle after Conv2d": _conv(lambda: nn.Conv2d(4, 8, 3, padding=1), 288, IMG,
                                       lambda s, h: F.pixel_shuffle(h, 2)),
    "Unfold after Conv2d": _conv(lambda: nn.Conv2d(4, 2, 3), 32, IMG,
                                 lambda s, h: F.unfold(h, 2, stride=2)),
    "Fold after Linear": (_m(lambda s, x: s.o(torch.tanh(F.fold(s.l(x.flatten(2)), (4, 4), 2))
                                              .flatten(1)),
                             l=lambda: nn.Linear(36, 9), o=lambda: nn.Linear(16, 4)), IMG),
    "AdaptiveMaxPool2d": _after_conv(lambda: nn.AdaptiveMaxPool2d(2), 12),
    "MaxPool2d ceil_mode": _after_conv(lambda: nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                                       48, lambda: nn.Conv2d(4, 3, 3, padding=1)),
}


def _offsets(last):
    def fwd(s, x):
        flat = x.reshape(-1)
        offs = torch.arange(x.shape[0]) * x.shape[1]
        offs[1] += 2  # bags of unequal lengths
        if last:
            offs = torch.cat([offs, torch.tensor([flat.numel()])])
        w = torch.linspace(0.2, 1.7, flat.numel(), dtype=DT) if s.e.mode == "sum" else None
        return s.o(torch.tanh(s.e(flat, offs, per_sample_weights=w)))
    return fwd


def _lookup(e, fwd=None):
    fwd = fwd or (lambda s, x: s.o(torch.tanh(s.e(x)).mean(1)))
    return (_m(fwd, e=e, o=lambda: nn.Linear(5, 4)), IDS)


LOOKUPS = {
    "Embedding max_norm, norm_type 1, padding_idx": _lookup(
        lambda: nn.Embedding(9, 5, max_norm=0.7, norm_type=1.0, padding_idx=0)),
    "Embedding max_norm called twice": _lookup(
        lambda: nn.Embedding(9, 5, max_norm=1.0),
        lambda s, x: s.o(torch.tanh(s.e(x)).mean(1) + s.e(x.flip(1))[:, 0])),
    "Embedding scale_grad_by_freq, padding_idx": _lookup(
        lambda: nn.Embedding(9, 5, scale_grad_by_freq=True, padding_idx=0)),
    "Embedding sparse, padding_idx": _lookup(lambda: nn.Embedding(9, 5, sparse=True,
                                                                  padding_idx=0)),
    "Embedding sparse, tied head": (_m(lambda s, x: F.linear(torch.tanh(s.e(x)).mean(1),
                                                             s.e.weight[:4]),
                                       e=lambda: nn.Embedding(9, 5, sparse=True)), IDS),
    "F.embedding sparse, padding_idx": (
        _m(lambda s, x: s.o(torch.tanh(F.embedding(x, s.w, padding_idx=0, sparse=True))
                            .mean(1)),
           w=lambda: nn.Parameter(torch.randn(9, 5)), o=lambda: nn.Linear(5, 4)), IDS),
    **{f"EmbeddingBag {mode} offsets, last {last}": _lookup(
        lambda mode=mode, last=last: nn.EmbeddingBag(9, 5, mode=mode, padding_idx=0,
                                                     include_last_offset=last),
        _offsets(last)) for mode in ("sum", "mean", "max") for last in (False, True)},
    "EmbeddingBag sparse, include_last_offset": _lookup(
        lambda: nn.EmbeddingBag(9, 5, mode="sum", sparse=True, include_last_offset=True),
        _offsets(True)),
    "EmbeddingBag mean, max_norm, padding_idx": _lookup(
        lambda: nn.EmbeddingBag(9, 5, mode="mean", max_norm=0.8, padding_idx=0),
        lambda s, x: s.o(torch.tanh(s.e(x)))),
    "EmbeddingBag an empty bag": _lookup(
        lambda: nn.EmbeddingBag(9, 5, mode="mean"),
        lambda s, x: s.o(torch.tanh(s.e(x.reshape(-1), torch.tensor([0, 0, 7, 12]))))),
}

LENS = torch.tensor([2, 5, 3, 1])


def _packed(out):
    def fwd(s, x):
        h, hn = s.r(pack_padded_sequence(x, LENS, batch_first=True, enforce_sorted=False))
        if out:
            return s.o(pad_packed_sequence(h, batch_first=True, total_length=5)[0].sum(1))
        return s.o((hn[0] if isinstance(hn, tuple) else hn)[-1])
    return fwd


def _loop(kind):
    def fwd(s, x):
        h, c = torch.tanh(s.h(x[:, 0])), None
        for t in range(x.shape[1]):
            if kind == "lstm":
                h, c = s.cell(x[:, t], (h, torch.zeros_like(h) if c is None else c))
            else:
                m = (t < LENS).to(x.dtype).unsqueeze(1)  # a masked update
                h = m * s.cell(x[:, t], h) + (1 - m) * h
        return s.o(h)
    return fwd


def _rec(r, fwd, width, zero=(), **mods):
    return (_m(fwd, r=r, o=lambda: nn.Linear(width, 4), **mods), RNN, zero)


def _last(s, x):
    return s.o(s.r(x)[0][:, -1])


RECURRENT = {
    "RNN relu, 2 layers, dropout, eval": _rec(
        lambda: nn.RNN(3, 4, num_layers=2, dropout=0.5, nonlinearity="relu",
                       batch_first=True).eval(), _last, 4),
    "LSTM 2 layers, dropout, train": _rec(
        lambda: nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True), _last, 4),
    "GRU bidirectional, 2 layers": _rec(
        lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), _last, 8,
        ("r.weight_hh_l1_reverse",)),  # the last output of the reverse direction: its first step
    "LSTM proj_size, bidirectional": _rec(
        lambda: nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=True),
        lambda s, x: s.o(s.r(x)[0][:, 0]), 4, ("r.weight_hh_l0",)),
    "RNN sequence-first, bidirectional h_n": _rec(
        lambda: nn.RNN(3, 4, bidirectional=True, num_layers=2),
        lambda s, x: s.o(s.r(x.transpose(0, 1))[1].transpose(0, 1).flatten(1)), 16),
    "LSTM proj_size, sequence-first, states from the input": _rec(
        lambda: nn.LSTM(3, 4, proj_size=2),
        lambda s, x: s.o(s.r(x.transpose(0, 1), (torch.tanh(s.h(x[:, 0])).view(1, -1, 2),
                                                 s.c(x[:, 1]).view(1, -1, 4)))[0][-1]), 2,
        h=lambda: nn.Linear(3, 2), c=lambda: nn.Linear(3, 4)),
    "GRU initial state a parameter": _rec(
        lambda: nn.GRU(3, 4, batch_first=True),
        lambda s, x: s.o(s.r(x, s.h0.expand(-1, x.shape[0], -1).contiguous())[0][:, -1]), 4,
        h0=lambda: nn.Parameter(torch.randn(1, 1, 4))),
    "packed GRU bidirectional, unsorted, outputs": _rec(
        lambda: nn.GRU(3, 4, batch_first=True, bidirectional=True), _packed(True), 8),
    "packed RNN relu 2 layers, unsorted, h_n": _rec(
        lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", batch_first=True),
        _packed(False), 4),
    "packed LSTM proj_size bidirectional, outputs": _rec(
        lambda: nn.LSTM(3, 4, proj_size=2, bidirectional=True, batch_first=True),
        _packed(True), 4),
    "LSTMCell looped, state from the input": (
        _m(_loop("lstm"), cell=lambda: nn.LSTMCell(3, 4), h=lambda: nn.Linear(3, 4),
           o=lambda: nn.Linear(4, 4)), RNN),
    "GRUCell looped, masked update": (
        _m(_loop("gru"), cell=lambda: nn.GRUCell(3, 4, bias=False), h=lambda: nn.Linear(3, 4),
           o=lambda: nn.Linear(4, 4)), RNN),
}

PANEL = {**PARAMETRIZED, **LAYERS, **LOOKUPS, **RECURRENT}
NAMES = list(PANEL)


@pytest.mark.parametrize("name", NAMES)
def test_panel_against_the_oracle(name):
    make, batches, *zero = PANEL[name]
    i = NAMES.index(name)
    for fim_type in ("exact", OTHERS[i % 7], OTHERS[(i + 3) % 7]):
        check(make, batches, fim_type, *zero)
