"""Models for tests/test_adversarial_round5.py beside round4's: attention variants, low-rank
adapters, views of one parameter, bags, hooks, transformed output heads, diagonal likelihoods,
``class_dim=1`` rows and small Hugging Face models. ``EXTRA``: ``{name: (make, batches, before,
kw, zero)}`` as round5's ``MODELS``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from cases import Fn
from torch.nn.utils import parametrize as P

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


def _tokens(k=2, n=3, t=4, vocab=7, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        ids = torch.randint(1, vocab, (n, t), generator=g)
        lab = torch.randint(0, classes, (n, t), generator=g)
        lab[0, i + 1:] = -100
        lab[2, 0] = -100
        out.append((ids, lab))
    return out


def _fn(fwd, **mods):
    def make():
        torch.manual_seed(0)
        return Fn(fwd, **{k: m() for k, m in mods.items()}).to(DT)
    return make


# -- attention -------------------------------------------------------------------------------- #
def _mha_kv(s, x):
    mem = torch.tanh(s.m(x))
    out, _ = s.a(x, mem, mem[..., :3], need_weights=True, average_attn_weights=False)
    return s.o(out.mean(1))


def _mha_seq_first(s, x):
    xt = x.transpose(0, 1)
    out, _ = s.a(xt, xt, xt, need_weights=False)
    return s.o(torch.tanh(out).mean(0))


class _MhaTokens(nn.Module):
    """Token logits through self-attention with a key padding mask (id 0) and a causal mask."""

    def __init__(self, tied=False):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(7, 6, padding_idx=0)
        self.a = nn.MultiheadAttention(6, 2, batch_first=True)
        self.h = nn.Linear(6, 7 if tied else 4)
        if tied:
            self.h.weight = self.e.weight
        self.to(DT)

    def forward(self, ids):
        h = self.e(ids)
        T = ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        out, _ = self.a(h, h, h, key_padding_mask=ids == 0, attn_mask=causal, need_weights=False)
        return self.h(h + out)


def _padded_tokens(classes=4, vocab=7):
    out = _tokens(classes=classes, vocab=vocab)
    out[1][0][1, 2:] = 0
    out[1][1][1, 2:] = -100
    return out


def _sdpa(causal, gqa=False):
    def fwd(s, x):
        N, T, _ = x.shape
        q = s.q(x).view(N, T, 4, 2).transpose(1, 2)
        kv = s.k(x).view(N, T, 2 if gqa else 4, 2).transpose(1, 2)
        mask = None if causal else torch.linspace(-1, 1, T * T, dtype=x.dtype).view(T, T)
        y = F.scaled_dot_product_attention(q, kv, kv.tanh(), attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa)
        return s.o(y.transpose(1, 2).reshape(N, T, 8).mean(1))
    return _fn(fwd, q=lambda: nn.Linear(5, 8), k=lambda: nn.Linear(5, 4 if gqa else 8),
               o=lambda: nn.Linear(8, 3))


# -- low-rank adapters and views of one parameter -------------------------------------------- #
class _Lora(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.base = nn.Linear(5, 6)
        self.base.requires_grad_(how == "parametrize")
        self.A = nn.Parameter(torch.randn(2, 5) * 0.5)
        self.B = nn.Parameter(torch.randn(6, 2) * 0.5)
        self.o = nn.Linear(6, 4)
        self.to(DT)
        if how == "parametrize":
            P.register_parametrization(self.base, "weight", _Delta(self.A, self.B))

    def forward(self, x):
        if self.how == "parametrize":
            h = self.base(x)
        elif self.how == "merged":
            h = F.linear(x, self.base.weight + 0.5 * self.B @ self.A, self.base.bias)
        else:
            h = self.base(x) + 0.5 * F.linear(F.linear(x, self.A), self.B)
        return self.o(torch.tanh(h))


class _Delta(nn.Module):
    def __init__(self, A, B):
        super().__init__()
        self.A, self.B = [A], [B]  # not submodules' parameters: the model's own

    def forward(self, w):
        return w + 0.5 * self.B[0] @ self.A[0]


def _views():
    torch.manual_seed(0)
    return Fn(lambda s, x: F.linear(torch.tanh(F.linear(x, s.w[:6, :5], s.w[6, :6])),
                                    s.w[7:, :6].flip(0)) + s.w[0, :4],
              w=nn.Parameter(torch.randn(11, 6) * 0.6)).to(DT)


def _transposed_tie():
    torch.manual_seed(0)
    return Fn(lambda s, x: F.linear(torch.tanh(s.a(x)), s.b.weight.t()[:4] * 0.7) + s.b(
        torch.tanh(s.a(x)))[:, :4].sin(), a=nn.Linear(5, 6), b=nn.Linear(6, 6)).to(DT)


# -- bags, hooks, heads --------------------------------------------------------------------- #
def _bag():
    def fwd(s, ids):
        w = torch.linspace(0.5, 1.5, ids.numel(), dtype=DT).view_as(ids)
        return s.o(torch.tanh(s.e(ids, per_sample_weights=w)))
    return _fn(fwd, e=lambda: nn.EmbeddingBag(9, 4, mode="sum", padding_idx=0),
               o=lambda: nn.Linear(4, 3))


def _hooked(kind):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 4)).to(DT)
        if kind == "pre":
            m[2].register_forward_pre_hook(lambda mod, a: (a[0] * 1.5 + 0.1,))
        elif kind == "inplace":
            m[2].register_forward_hook(lambda mod, a, out: out.mul_(0.5).add_(a[0][:, :1]))
        else:
            m[4].register_forward_hook(lambda mod, a, out: 3 * torch.tanh(out / 3))
        return m
    return make


class _Capped(nn.Module):
    """Token logits soft-capped after the head (``cap * tanh(z / cap)``) or scaled by a learned
    temperature."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.e, self.l, self.h = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 4)
        if how != "cap":
            self.t = nn.Parameter(torch.tensor(1.3))
        self.to(DT)

    def forward(self, ids):
        z = self.h(torch.tanh(self.l(self.e(ids))))
        return 2.0 * torch.tanh(z / 2.0) if self.how == "cap" else z * self.t


def _seg():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, groups=1), nn.Tanh(),
                         nn.ConvTranspose1d(4, 4, 3, padding=1, groups=2), nn.Tanh(),
                         nn.Conv1d(4, 3, 1)).to(DT)


def _seg_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(2):
        y = torch.randint(0, 3, (2, 4), generator=g)
        y[i, 1:3] = -100
        out.append((torch.randn(2, 3, 4, generator=g, dtype=DT), y))
    return out


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)


def _inputs(k=2, seed=4):
    """Unlabelled batches (the HUTCHINSON types do not read targets)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 5, generator=g, dtype=DT),) for _ in range(k)]


def _sentences():
    return [(x, y[:, 0].clamp_min(0)) for x, y in _tokens(classes=3, vocab=11)]


# -- Hugging Face ---------------------------------------------------------------------------- #
def _hf(kind):
    def make():
        import transformers as tf

        torch.manual_seed(0)
        if kind == "vit":
            c = tf.ViTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=8,
                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                             num_labels=3, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, initializer_range=0.5)
            m = tf.ViTForImageClassification(c)
        else:
            c = tf.RobertaConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=12,
                                 max_position_embeddings=16, num_labels=3, pad_token_id=1,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 initializer_range=0.5)
            m = (tf.RobertaForTokenClassification if kind == "roberta tokens"
                 else tf.RobertaForSequenceClassification)(c)
        return Fn(lambda s, x: s.m(x).logits, m=m.double().eval())
    return make


# a key bias adds one constant per query to its scores: no effect on the softmax
_KEY_BIAS = "m.roberta.encoder.layer.0.attention.self.key.bias"
EXTRA = {
    "mha bias_kv, zero_attn, kdim/vdim, per-head weights": (
        _fn(_mha_kv, m=lambda: nn.Linear(6, 4), o=lambda: nn.Linear(6, 3),
            a=lambda: nn.MultiheadAttention(6, 2, bias=True, add_bias_kv=True,
                                            add_zero_attn=True, kdim=4, vdim=3,
                                            batch_first=True)),
        _batches(shape=(3, 6), classes=3), None, {}, ()),
    "mha sequence-first inputs": (
        _fn(_mha_seq_first, a=lambda: nn.MultiheadAttention(6, 3), o=lambda: nn.Linear(6, 4)),
        _batches(shape=(3, 6)), None, {}, ()),
    "mha token logits, key padding and causal masks": (
        lambda: _MhaTokens(), _padded_tokens(), None, {"class_dim": -1}, ()),
    "mha token logits, head tied to the embedding": (
        lambda: _MhaTokens(tied=True), _padded_tokens(classes=7), None, {"class_dim": -1}, ()),
    "sdpa causal": (_sdpa(True), _batches(shape=(3, 5), classes=3), None, {}, ()),
    "sdpa float mask": (_sdpa(False), _batches(shape=(3, 5), classes=3), None, {}, ()),
    "sdpa grouped-query": (_sdpa(True, gqa=True), _batches(shape=(3, 5), classes=3), None, {},
                           ()),
    "lora, two matmuls": (lambda: _Lora("two"), _batches(), None, {}, ()),
    "lora, merged weight": (lambda: _Lora("merged"), _batches(), None, {}, ()),
    "lora, parametrization on a trainable base": (lambda: _Lora("parametrize"), _batches(),
                                                  None, {}, ()),
    "slices of one parameter as every weight": (_views, _batches(), None, {}, ()),
    "transposed weight used twice": (_transposed_tie, _batches(), None, {}, ()),
    "EmbeddingBag sum, per_sample_weights, padding_idx": (
        _bag(), _batches(shape=(4,), classes=3, ids=9), None, {}, ()),
    "forward pre-hook": (_hooked("pre"), _batches(), None, {}, ()),
    "forward hook writing in place": (_hooked("inplace"), _batches(), None, {}, ()),
    "head output soft-capped by a hook": (_hooked("cap"), _batches(), None, {}, ()),
    "token logits soft-capped": (lambda: _Capped("cap"), _tokens(), None, {"class_dim": -1},
                                 ()),
    "token logits, learned temperature": (lambda: _Capped("temp"), _tokens(), None,
                                          {"class_dim": -1}, ()),
    "class_dim=1, grouped transposed conv": (_seg, _seg_batches(), None, {
        "class_dim": 1, "logits_fn": lambda m, b: m(b[0]).movedim(1, -1)}, ()),
    "bernoulli": (_mlp, _inputs(), None, {"likelihood": "bernoulli"}, ()),
    "gaussian, sigma2 0.3": (_mlp, _inputs(), None, {"likelihood": "gaussian", "sigma2": 0.3},
                             ()),
    "HF ViT": (_hf("vit"), _batches(shape=(2, 8, 8), classes=3), None, {},
               ("m.vit.layers.0.attention.k_proj.bias",)),
    "HF RoBERTa sequence classification": (_hf("roberta"), _sentences(),
                                           None, {}, (_KEY_BIAS,)),
    "HF RoBERTa token classification": (_hf("roberta tokens"), _tokens(classes=3, vocab=11),
                                        None, {"class_dim": -1}, (_KEY_BIAS,)),
}
