"""Models of the tenth adversarial round (tests/test_adversarial_round10_blocks.py), in plain
PyTorch, float64: a decoder block with today's variants (rotary embeddings, grouped queries,
fused qkv, QK-norm, masks, sinks, ALiBi, gated MLPs, parallel and sandwich layouts, layer scale),
a sequence classifier and a causal LM around it, the fine-tuning methods that train a subset or
an addition (LoRA, DoRA, VeRA, IA3, adapters, BitFit, prompt tuning), mixture-of-depths blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64
V, D, H, HD, KVH, FF, C = 11, 8, 4, 2, 2, 12, 3
N, T = 3, 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(n: int = 2, pad: bool = True) -> list:
    """``n`` batches of ``(N, T)`` ids (0 pads the ends of two sequences) and class labels."""
    out = []
    for i in range(n):
        g = _gen(100 + i)
        x = torch.randint(1, V, (N, T), generator=g)
        if pad:
            x[1, T - 2:] = 0
            x[2, T - 1:] = 0
        out.append((x, torch.randint(0, C, (N,), generator=g)))
    return out


def lm_tokens(n: int = 2) -> list:
    """``n`` batches of ``(N, T)`` ids with next-token labels ``(N, T - 1)``, two ignored."""
    out = []
    for i in range(n):
        x = torch.randint(0, V, (N, T), generator=_gen(200 + i))
        x[0, :2] = 0
        y = x[:, 1:].clone()
        y[1, -2:] = -100
        out.append((x, y))
    return out


def _rope(hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10.0 ** (torch.arange(0, hd, 2, dtype=DT) / hd)
    f = torch.outer(torch.arange(16, dtype=DT), inv)
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _complex_rope(t, Tt):
    inv = 1.0 / 10.0 ** (torch.arange(0, HD, 2, dtype=DT) / HD)
    fr = torch.polar(torch.ones(Tt, HD // 2, dtype=DT),
                     torch.outer(torch.arange(Tt, dtype=DT), inv))
    z = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2))
    return torch.view_as_real(z * fr).flatten(3)


class Block(nn.Module):
    """A pre-norm decoder block; the keyword arguments pick the variants."""

    def __init__(self, gqa="repeat_interleave", qknorm=False, fused=True, mlp="swiglu",
                 parallel=False, layerscale=False, sandwich=False, sink=False, alibi=False,
                 window=None, rope="half"):
        super().__init__()
        self.gqa, self.qknorm, self.fused, self.mlp = gqa, qknorm, fused, mlp
        self.parallel = parallel
        self.ls, self.sandwich, self.sink, self.alibi = layerscale, sandwich, sink, alibi
        self.window, self.rope = window, rope
        self.n1, self.n2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.kvh = KVH if gqa else H
        if fused:
            self.qkv = nn.Linear(D, (H + 2 * self.kvh) * HD, bias=False)
        else:
            self.q, self.k = nn.Linear(D, H * HD), nn.Linear(D, self.kvh * HD)
            self.v = nn.Linear(D, self.kvh * HD)
        self.o = nn.Linear(H * HD, D, bias=False)
        if qknorm:
            self.qn, self.kn = nn.RMSNorm(HD), nn.RMSNorm(HD)
        gated = mlp in ("swiglu", "geglu")
        self.up = nn.Linear(D, 2 * FF, bias=False) if gated else nn.Linear(D, FF)
        self.down = nn.Linear(FF, D, bias=False)
        if layerscale:
            self.g1 = nn.Parameter(torch.full((D,), 0.5))
            self.g2 = nn.Parameter(torch.full((D,), 0.7))
        if sandwich:
            self.pn1, self.pn2 = nn.RMSNorm(D), nn.RMSNorm(D)
        if sink:
            self.sinks = nn.Parameter(torch.randn(H) * 0.5)
        cos, sin = _rope(HD)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]),
                             persistent=False)

    def _qkv(self, x):
        Nn, Tt, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split([H * HD, self.kvh * HD, self.kvh * HD], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(Nn, Tt, H, HD).transpose(1, 2)
        k = k.view(Nn, Tt, self.kvh, HD).transpose(1, 2)
        v = v.view(Nn, Tt, self.kvh, HD).transpose(1, 2)
        if self.qknorm:
            q, k = self.qn(q), self.kn(k)
        if self.rope == "half":
            cos, sin = self.cos[:Tt], self.sin[:Tt]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        elif self.rope == "complex":
            q, k = _complex_rope(q, Tt), _complex_rope(k, Tt)
        r = H // self.kvh
        if self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        elif self.gqa == "expand":
            k = k[:, :, None].expand(Nn, self.kvh, r, Tt, HD).reshape(Nn, H, Tt, HD)
            v = v[:, :, None].expand(Nn, self.kvh, r, Tt, HD).reshape(Nn, H, Tt, HD)
        return q, k, v

    def _mask(self, pad, Tt):
        i = torch.arange(Tt)
        allowed = i[None, :] <= i[:, None]
        if self.window:
            allowed = allowed & (i[:, None] - i[None, :] < self.window)
        return allowed[None, None] & (pad[:, None, None, :] | (i[:, None] == i[None, :]))

    def attn(self, x, pad):
        Nn, Tt, _ = x.shape
        q, k, v = self._qkv(x)
        allowed = self._mask(pad, Tt)
        if not (self.sink or self.alibi):
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               scale=0.9 / math.sqrt(HD),
                                               enable_gqa=self.gqa == "sdpa")
            return self.o(a.transpose(1, 2).reshape(Nn, Tt, H * HD))
        if self.gqa == "sdpa":
            k, v = k.repeat_interleave(H // self.kvh, 1), v.repeat_interleave(H // self.kvh, 1)
        sc = q @ k.transpose(-1, -2) / math.sqrt(HD)
        if self.alibi:
            i = torch.arange(Tt)
            sc = sc - self.slopes[:, None, None].to(sc.dtype) * (i[:, None] - i[None, :]).abs()
        sc = sc.masked_fill(~allowed, float("-inf"))
        if self.sink:  # a learned logit per head, concatenated to the scores and dropped after
            s = self.sinks.view(1, H, 1, 1).expand(Nn, H, Tt, 1)
            p = torch.cat([sc, s], -1).softmax(-1)[..., :-1]
        else:
            p = sc.softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(Nn, Tt, H * HD))

    def ff(self, x):
        if self.mlp == "swiglu":
            g, u = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(g) * u)
        if self.mlp == "geglu":
            u, g = self.up(x).split(FF, dim=-1)
            return self.down(u * F.gelu(g, approximate="tanh"))
        return self.down(F.gelu(self.up(x)))

    def forward(self, x, pad):
        if self.parallel:
            hn = self.n1(x)
            return x + self.attn(hn, pad) + self.ff(hn)
        a = self.attn(self.n1(x), pad)
        a = self.pn1(a) if self.sandwich else a
        x = x + (a * self.g1 if self.ls else a)
        f = self.ff(self.n2(x))
        f = self.pn2(f) if self.sandwich else f
        return x + (self.g2 * f if self.ls else f)


class Classifier(nn.Module):
    """Token ids -> blocks -> the last non-pad token (or the masked mean) -> logits, the head
    plus (``tied``) the embedding table through ``F.linear`` on ``C`` of its rows."""

    def __init__(self, pool="last", tied=True, L=1, share=False, prompt=0, **block):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=0)
        first = Block(**block)
        self.blocks = nn.ModuleList([first] + [first if share else Block(**block)
                                               for _ in range(L - 1)])
        self.nf = nn.RMSNorm(D)
        self.pool, self.tied = pool, tied
        self.head = nn.Linear(D, C)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1 and p is not self.emb.weight:
                    p.add_(torch.randn_like(p) * 0.3)
        self.prompt = nn.Parameter(torch.randn(prompt, D)) if prompt else None
        self.to(DT)

    def forward(self, ids):
        pad = ids != 0
        h = self.emb(ids) * math.sqrt(D)
        if self.prompt is not None:  # prompt tuning: trained tokens before the sequence
            h = torch.cat([self.prompt.expand(ids.shape[0], -1, -1), h], 1)
            pad = torch.cat([torch.ones(ids.shape[0], self.prompt.shape[0], dtype=torch.bool),
                             pad], 1)
        for b in self.blocks:
            h = b(h, pad)
        h = self.nf(h)
        if self.pool == "last":
            z = h[torch.arange(ids.shape[0]), pad.sum(1) - 1]
        else:
            m = pad.unsqueeze(-1).to(h.dtype)
            z = (h * m).sum(1) / m.sum(1)
        if self.tied:
            return F.linear(z, self.emb.weight)[:, 1:C + 1] + self.head(z)
        return self.head(z)


class CausalLM(nn.Module):
    """Next-token logits ``(N, T - 1, V)`` through the embedding table (``tie``: how)."""

    def __init__(self, tie="linear", **block):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.blk = Block(**block)
        self.nf = nn.RMSNorm(D)
        self.tie = tie
        self.register_buffer("normalizer", torch.tensor(D ** 0.5), persistent=False)
        self.to(DT)

    def forward(self, ids):
        h = self.emb(ids) * self.normalizer
        h = self.nf(self.blk(h, torch.ones_like(ids, dtype=torch.bool)))
        W = self.emb.weight
        if self.tie == "matmul":
            z = h @ W.T
        elif self.tie == "einsum":
            z = torch.einsum("ntd,vd->ntv", h, W)
        elif self.tie == "softcap":
            z = 3.0 * torch.tanh(F.linear(h, W) / 3.0)
        else:
            z = F.linear(h, W) / D ** 0.5
        return z[:, :-1]


# ------------------------------------------------------------------------------- fine-tuning


class Lora(nn.Module):
    """A frozen base plus ``scale * B A x``: bare parameters or two ``nn.Linear``."""

    def __init__(self, base, how="matmul", r=2, scale=2.0):
        super().__init__()
        self.base, self.how, self.scale = base, how, scale
        base.requires_grad_(False)
        if how == "matmul":
            self.A = nn.Parameter(torch.randn(r, base.in_features, dtype=DT) * 0.5)
            self.B = nn.Parameter(torch.randn(base.out_features, r, dtype=DT) * 0.5)
        else:
            self.lA = nn.Linear(base.in_features, r, bias=False, dtype=DT)
            self.lB = nn.Linear(r, base.out_features, bias=False, dtype=DT)
            nn.init.normal_(self.lB.weight, std=0.5)

    def forward(self, x):
        if self.how == "matmul":
            return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale
        return self.base(x) + self.lB(self.lA(x)) * self.scale


class Dora(nn.Module):
    """Weight-decomposed LoRA: a magnitude ``m`` over the column norms of ``W + B A``, the norm
    detached (as PEFT computes it) or differentiated."""

    def __init__(self, base, detach=True, r=2):
        super().__init__()
        self.base, self.detach = base, detach
        base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, dtype=DT) * 0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, r, dtype=DT) * 0.5)
        self.m = nn.Parameter(base.weight.norm(dim=1).detach().clone() * 1.1)

    def forward(self, x):
        W = self.base.weight + 2.0 * self.B @ self.A
        n = W.norm(p=2, dim=1, keepdim=True)
        if not self.detach:
            return F.linear(x, self.m[:, None] * W / n, self.base.bias)
        out = (self.m / n.detach().squeeze(1)) * (self.base(x) - self.base.bias
                                                  + 2.0 * (x @ self.A.T @ self.B.T))
        return out + self.base.bias


class Vera(nn.Module):
    """VeRA: frozen random projections shared by the layers (held in a list, no parameter),
    trained vectors ``d`` and ``b``."""

    def __init__(self, base, A, B):
        super().__init__()
        self.base, self.A, self.B = base, A, B
        base.requires_grad_(False)
        self.d = nn.Parameter(torch.rand(A[0].shape[0], dtype=DT) + 0.5)
        self.b = nn.Parameter(torch.randn(B[0].shape[0], dtype=DT) * 0.5)

    def forward(self, x):
        return self.base(x) + self.b * ((self.d * (x @ self.A[0].T)) @ self.B[0].T)


class Adapter(nn.Module):
    """A bottleneck adapter after a frozen layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.dn, self.upa = nn.Linear(D, 2, dtype=DT), nn.Linear(2, D, dtype=DT)

    def forward(self, x):
        h = self.inner(x)
        return h + self.upa(F.gelu(self.dn(h)))


class Scale(nn.Module):
    """IA3: a trained vector multiplying a frozen layer's output."""

    def __init__(self, inner, n):
        super().__init__()
        self.inner, self.l = inner, nn.Parameter(1 + 0.3 * torch.randn(n, dtype=DT))

    def forward(self, x):
        return self.inner(x) * self.l


def fine_tuned(kind: str) -> nn.Module:
    """A frozen :class:`Classifier` (unfused attention, GELU MLP) whose first block is adapted
    by ``kind``; the head is trained with the additions (BitFit trains the biases only)."""
    lora = kind.startswith("lora")
    m = Classifier(tied=not lora, fused=lora, gqa=None if lora else "repeat_interleave",
                   mlp="gelu", pool="mean" if kind == "lora mean" else "last")
    if kind == "bitfit":
        for n, p in m.named_parameters():
            p.requires_grad_(n.endswith("bias"))
        return m
    m.requires_grad_(False)
    b = m.blocks[0]
    if lora:
        for t in ("qkv", "o", "up", "down"):
            setattr(b, t, Lora(getattr(b, t), how="linear" if "linear" in kind else "matmul"))
    elif kind.startswith("dora"):
        for t in ("q", "v", "up"):
            setattr(b, t, Dora(getattr(b, t), detach=kind == "dora"))
    elif kind == "vera":
        g = _gen(5)
        A = [torch.randn(3, D, generator=g, dtype=DT)]
        b.q = Vera(b.q, A, [torch.randn(H * HD, 3, generator=g, dtype=DT)])
        b.v = Vera(b.v, A, [torch.randn(KVH * HD, 3, generator=g, dtype=DT)])
        b.down = Vera(b.down, [torch.randn(3, FF, generator=g, dtype=DT)],
                      [torch.randn(D, 3, generator=g, dtype=DT)])
    elif kind == "ia3":
        b.k, b.v = Scale(b.k, KVH * HD), Scale(b.v, KVH * HD)
        b.up = Scale(b.up, FF)
    elif kind == "adapter":
        b.o, b.down = Adapter(b.o), Adapter(b.down)
    m.head.requires_grad_(True)
    return m


def prompt_tuned() -> nn.Module:
    m = Classifier(prompt=2, tied=False)
    m.requires_grad_(False)
    m.prompt.requires_grad_(True)
    m.head.requires_grad_(True)
    return m


# --------------------------------------------------------------------------- mixture of depths


class MixtureOfDepths(nn.Module):
    """The top-``k`` tokens of each sequence (by a router) through an MLP, weighted by the
    router, the others skipping it: by ``gather`` / ``scatter_add``, by flattened index and
    ``index_add``, sorted and ``index_copy``, by a boolean mask."""

    def __init__(self, how, mlp="gelu", k=2):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.k, self.mlp = how, k, mlp
        self.emb = nn.Embedding(V, D)
        self.router = nn.Linear(D, 1)
        self.up = nn.Linear(D, 2 * FF if mlp == "swiglu" else FF)
        self.down = nn.Linear(FF, D)
        self.n = nn.LayerNorm(D) if how == "mask" else None
        self.head = nn.Linear(D, C)
        self.to(DT)

    def block(self, x):
        if self.mlp == "swiglu":
            g, u = self.up(x).chunk(2, -1)
            return self.down(F.silu(g) * u)
        return self.down(F.gelu(self.up(x)))

    def forward(self, ids):
        h = self.emb(ids)
        Nn, Tt, d = h.shape
        r = self.router(h).squeeze(-1)
        w, idx = r.topk(self.k, dim=1)
        if self.how == "gather":
            ie = idx[..., None].expand(-1, -1, d)
            out = self.block(torch.gather(h, 1, ie)) * torch.sigmoid(w)[..., None]
            h = h.scatter_add(1, ie, out)
        elif self.how in ("flat", "sorted"):
            flat = (idx + torch.arange(Nn)[:, None] * Tt).reshape(-1)
            wf = torch.sigmoid(w).reshape(-1, 1)
            f = h.reshape(-1, d)
            if self.how == "flat":
                h = f.index_add(0, flat, self.block(f[flat]) * wf).view(Nn, Tt, d)
            else:
                flat, order = flat.sort()
                out = self.block(f.index_select(0, flat)) * wf[order]
                h = f.index_copy(0, flat, f[flat] + out).view(Nn, Tt, d)
        else:
            m = torch.zeros(Nn, Tt, dtype=torch.bool).scatter(1, idx, True)
            f = h.clone()
            f[m] = h[m] + self.block(self.n(h[m])) * torch.sigmoid(r)[m][:, None]
            h = f
        return self.head(torch.tanh(h).mean(1))
