"""Adversarial checks, seventh round: output shapes and likelihoods, attention variants, rotary
embeddings and parameters inside contractions, each against the float64 oracle of every step
(tests/adversarial.py) under EXACT, EMPIRICAL, MONTE_CARLO, HUTCHINSON and HUTCHINSON_DG.

Outputs: masked vocabulary entries (``finfo.min`` and ``-1e4``: classes of probability 0, the
label on one in a batch), large logits, tuples, mappings and ``ModelOutput``, token logits with
whole sequences ignored; 1-D and one-class categorical logits and ``-inf`` in valid rows are
refused. Attention: ``F.scaled_dot_product_attention`` with boolean and float masks per sample,
``dropout_p``, ``scale`` and grouped keys; ``nn.MultiheadAttention`` with 3-D masks, float key
padding masks, causal masks, ``kdim``/``vdim``, sequence-first inputs, the weights returned per
head; ``nn.TransformerEncoderLayer`` with ``norm_first`` and padding; ``nn.Transformer`` with a
causal target mask. Rotary embeddings through complex numbers (``torch.polar``,
``view_as_complex``, learnable frequencies) and cos/sin tables; ``einsum``/``matmul``/``bmm`` with
parameters, a learnable temperature, parameters in the head only; ``torch.vmap`` and
``torch.func.jvp`` over layers inside the forward.
"""

from __future__ import annotations

import adversarial as adv
import pytest
import torch
import torch.nn.functional as F
from cases import Fn
from tolerances import DET_REL_F64
from torch import nn

import fimfast

pytestmark = pytest.mark.filterwarnings("ignore")

N, T, D = 4, 3, 8
TYPES = ["exact", "empirical", "monte_carlo", "hutchinson", "hutchinson_dg"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(shape, C: int = 3, labels=None, n: int = 2) -> list:
    out = []
    for i in range(n):
        x = torch.randn(*shape, generator=_gen(10 + i), dtype=torch.float64)
        y = torch.randint(0, C, labels or (shape[0],), generator=_gen(20 + i))
        out.append((x, y))
    return out


def _exact_all(build, batches, types=TYPES, **kw):
    for fim_type in types:
        torch.manual_seed(0)
        est, ref = adv.run(build().double(), batches, fim_type, **kw)
        assert adv.nonzero(ref), fim_type
        err = adv.max_rel(est, ref)
        assert err <= DET_REL_F64, (fim_type, err)


def _mlp(fwd, C: int = 5, d: int = D, **extra):
    def build():
        m = Fn(fwd, a=nn.Linear(d, d), o=nn.Linear(d, C))
        for k, v in extra.items():
            setattr(m, k, v)
        return m
    return build


# ------------------------------------------------------------------------------------ outputs

_MASK = torch.tensor([False, True, False, True, False])


def _masked(fill):
    return lambda s, x: s.o(torch.tanh(s.a(x))).masked_fill(
        s.mask, torch.finfo(x.dtype).min if fill is None else fill)


OUTPUTS = {
    "finfo.min on two classes": (_mlp(_masked(None), mask=_MASK), {}),
    "-1e4 on two classes": (_mlp(_masked(-1e4), mask=_MASK), {}),
    "logits x 100": (_mlp(lambda s, x: 100.0 * s.o(torch.tanh(s.a(x)))), {}),
    "tuple (logits, features)": (_mlp(lambda s, x: (s.o(torch.tanh(s.a(x))), s.a(x))), {}),
    "mapping with logits": (_mlp(lambda s, x: {"logits": s.o(torch.tanh(s.a(x)))}),
                            {"logits_fn": lambda m, b: m(b[0])["logits"]}),
}


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_output_forms(name):
    build, kw = OUTPUTS[name]
    batches = _batches((N, D), 5)
    batches[1][1][:] = torch.tensor([1, 3, 0, 2])  # labels on the masked classes too
    _exact_all(build, batches, **kw)


def test_model_output_and_token_logits_with_whole_sequences_ignored():
    from transformers.modeling_outputs import TokenClassifierOutput

    build = _mlp(lambda s, x: TokenClassifierOutput(logits=s.o(torch.tanh(s.a(x)))))
    batches = _batches((N, T, D), 5, labels=(N, T))
    batches[0][1][1] = -100
    batches[1][1][0] = -100
    batches[1][1][3, 1:] = -100
    _exact_all(build, batches, logits_fn=lambda m, b: m(b[0]).logits)


@pytest.mark.parametrize("fwd, match", [
    (lambda s, x: s.o(torch.tanh(s.a(x)))[:, 0], "2-D"),
    (lambda s, x: s.o(torch.tanh(s.a(x)))[:, :1], "C >= 2"),
    (lambda s, x: s.o(torch.tanh(s.a(x))).masked_fill(_MASK, float("-inf")), "non-finite"),
])
def test_logits_it_cannot_read_are_refused(fwd, match):
    model = _mlp(fwd)().double()
    x, y = _batches((N, D), 1)[0]
    for fim_type in TYPES:
        with pytest.raises(ValueError, match=match):
            fimfast.DiagFisher(model, fim_type).step((x, y * 0))


# ---------------------------------------------------------------------------------- attention


def _sdpa(kind):
    def fwd(s, x):
        q, k, v = s.qkv(x).view(N, T, 3, 2, 4).permute(2, 0, 3, 1, 4)
        if kind == "bool per sample":
            m = torch.ones(N, 1, T, T, dtype=torch.bool)
            m[1, :, :, 2] = False
            m[2, :, :, 0] = False
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        elif kind == "float per head":
            m = torch.randn(N, 2, T, T, generator=_gen(5), dtype=x.dtype)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        elif kind == "dropout_p":
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        else:  # grouped keys, a scale, causal
            a = F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], scale=0.7, is_causal=True,
                                               enable_gqa=True)
        return s.o(a.transpose(1, 2).reshape(N, T, D).mean(1))
    return lambda: Fn(fwd, qkv=nn.Linear(D, 3 * D), o=nn.Linear(D, 3))


def _mha(kind):
    def fwd(s, x):
        kw, kv = {}, x
        if kind == "3-D mask":
            m = torch.zeros(N * 2, T, T, dtype=x.dtype)
            m[1, :, 2] = float("-inf")
            m[5, 0, 1] = float("-inf")
            kw["attn_mask"] = m
        elif kind == "float key padding":
            m = torch.zeros(N, T, dtype=x.dtype)
            m[1, 2], m[2, 0] = float("-inf"), -3.0
            kw["key_padding_mask"] = m
        elif kind == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            kw["is_causal"] = True
        elif kind == "kdim, sequence-first, weights per head":
            kv = s.k(x)
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
            kw = {"need_weights": True, "average_attn_weights": False}
        out, w = s.m(x, kv, kv, **kw)
        if kind.startswith("kdim"):
            return s.o(out.transpose(0, 1).mean(1) + 0.3 * w.reshape(N, -1)[:, :1])
        return s.o(out.mean(1))
    kd = 5 if kind.startswith("kdim") else None
    extra = {"k": nn.Linear(D, 5)} if kd else {}
    return lambda: Fn(fwd, m=nn.MultiheadAttention(D, 2, batch_first=kd is None, kdim=kd,
                                                   vdim=kd), o=nn.Linear(D, 3), **extra)


def _encoder(norm_first):
    def fwd(s, x):
        pad = torch.zeros(N, T, dtype=torch.bool)
        pad[1, 2] = True
        m = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
        return s.o(s.e(s.i(x), mask=m, src_key_padding_mask=pad, is_causal=True)[:, 0])
    return lambda: Fn(fwd, i=nn.Linear(5, D), o=nn.Linear(D, 3), e=nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                   activation="gelu"), 1, enable_nested_tensor=False))


def _transformer(s, x):
    tm = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
    h = s.t(s.i(x), s.i(x.flip(1)), tgt_mask=tm, tgt_is_causal=True,
            memory_key_padding_mask=torch.tensor([[False, False, True]] * N))
    return s.o(h)


ATTENTION = {
    **{f"sdpa {k}": (_sdpa(k), (N, T, D), {}) for k in
       ("bool per sample", "float per head", "dropout_p", "grouped keys")},
    **{f"MultiheadAttention {k}": (_mha(k), (N, T, D), {}) for k in
       ("3-D mask", "float key padding", "causal", "kdim, sequence-first, weights per head")},
    "encoder norm_first": (_encoder(True), (N, T, 5), {}),
    "encoder post-norm": (_encoder(False), (N, T, 5), {}),
    "nn.Transformer causal target": (lambda: Fn(_transformer, i=nn.Linear(5, D),
                                                o=nn.Linear(D, 4), t=nn.Transformer(
                                                    D, 2, 1, 1, 16, dropout=0.0,
                                                    batch_first=True, norm_first=True)),
                                     (N, T, 5), {"class_dim": -1}),
}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_variants(name):
    build, shape, kw = ATTENTION[name]
    C = 4 if kw else 3
    heavy = not name.startswith(("sdpa", "Multi"))  # the oracle's Jacobians cost most there
    batches = _batches(shape, C, labels=(N, T) if kw else None, n=1 if heavy else 2)
    types = ["exact", "empirical", "hutchinson"] if heavy else TYPES
    _exact_all(build, batches, types=types, **kw)


# ----------------------------------------------------------- rotary, contractions, temperature


def _freqs(x, f):
    return torch.polar(torch.ones(T, 4, dtype=x.dtype),
                       torch.outer(torch.arange(T, dtype=x.dtype), f))


def _rope_complex(s, x):
    f = 1.0 / 10 ** torch.arange(4, dtype=x.dtype)
    q, k = (torch.view_as_real(torch.view_as_complex(t(x).view(N, T, 4, 2).contiguous())
                               * _freqs(x, f)).flatten(2) for t in (s.q, s.k))
    return s.o((torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1) @ s.v(x)).mean(1))


def _rope_learned(s, x):
    q = torch.view_as_complex(s.q(x).view(N, T, 4, 2).contiguous()) * _freqs(x, s.f)
    return s.o(torch.tanh(torch.view_as_real(q).flatten(2)).mean(1))


def _rope_cos_sin(s, x):
    pos = torch.arange(T, dtype=x.dtype)[:, None] / 10 ** torch.arange(4, dtype=x.dtype)
    cos, sin = pos.cos().repeat(1, 2), pos.sin().repeat(1, 2)

    def rot(t):
        return t * cos + torch.cat([-t[..., 4:], t[..., :4]], -1) * sin

    a = F.scaled_dot_product_attention(rot(s.q(x)), rot(s.k(x)), s.v(x), is_causal=True)
    return s.o(a[:, -1])


class Contractions(nn.Module):
    """``einsum`` with a 3-D weight and a bias, ``matmul`` by a weight, a learnable temperature,
    ``x @ U`` added, a token-mixing ``P @ x`` and a ``bmm`` with an expanded weight."""

    def __init__(self):
        super().__init__()
        g = _gen(3)
        self.W = nn.Parameter(0.3 * torch.randn(D, 2, 4, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(2, 4, generator=g))
        self.M = nn.Parameter(0.3 * torch.randn(4, 3, generator=g))
        self.U = nn.Parameter(0.3 * torch.randn(D, 3, generator=g))
        self.P = nn.Parameter(0.5 * torch.randn(T, T, generator=g))
        self.B = nn.Parameter(0.3 * torch.randn(1, D, 3, generator=g))
        self.temp = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        h = torch.tanh(torch.einsum("ntd,dhk->nthk", x, self.W) + self.b).sum(2)
        mixed = torch.tanh(self.P @ x)
        return (torch.matmul(h, self.M).mean(1) * self.temp.exp() + x.mean(1) @ self.U
                + torch.bmm(mixed, self.B.expand(N, -1, -1)).mean(1))


class ClipHead(nn.Module):
    """A cosine classifier: normalized features and class embeddings, a logit scale and a bias,
    the class embeddings and scale used in the head only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.cls = nn.Parameter(torch.randn(3, D, generator=_gen(4)))
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        f = F.normalize(self.a(x.mean(1)), dim=-1)
        return self.scale.exp() * f @ F.normalize(self.cls, dim=-1).t() + self.bias


def _vmap(s, x):
    h = torch.vmap(lambda xi: s.a(xi))(x)
    _, t = torch.func.jvp(lambda xx: s.b(xx), (x,), (torch.ones_like(x),))
    return s.o(torch.tanh(h).mean(1) + t.mean(1))


REST = {
    "rotary via complex numbers": lambda: Fn(_rope_complex, q=nn.Linear(D, D),
                                             k=nn.Linear(D, D), v=nn.Linear(D, D),
                                             o=nn.Linear(D, 3)),
    "rotary with learned frequencies": lambda: Fn(_rope_learned, q=nn.Linear(D, D),
                                                  o=nn.Linear(D, 3),
                                                  f=nn.Parameter(torch.rand(4, generator=_gen(6)))),
    "rotary via cos/sin tables": lambda: Fn(_rope_cos_sin, q=nn.Linear(D, D), k=nn.Linear(D, D),
                                            v=nn.Linear(D, D), o=nn.Linear(D, 3)),
    "contractions and a temperature": Contractions,
    "cosine head with a logit scale": ClipHead,
    "vmap and jvp over layers": lambda: Fn(_vmap, a=nn.Linear(D, D), b=nn.Linear(D, D, False),
                                           o=nn.Linear(D, 3)),
}


@pytest.mark.parametrize("name", list(REST))
def test_rotary_contractions_and_temperatures(name):
    _exact_all(REST[name], _batches((N, T, D)))
