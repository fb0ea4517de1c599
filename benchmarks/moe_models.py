"""Models that route rows of the batch to different modules, for tests and benchmarks.

* :class:`MoE`: a Switch (top-1) / Mixtral (top-2) mixture-of-experts block on ``(N, T, d)``:
  a linear router, top-``k`` experts per token (``k = 2``: the two gates renormalised), each
  expert an ``nn.Linear`` or a small MLP (``Linear -> GELU -> Linear``; ``swiglu``:
  ``w2(silu(w1 x) * w3 x)``) on its tokens, the outputs times their gate weights added back.
  Capacity-free, dispatched by index (``torch.where`` on the choices, ``x[idx]``,
  ``index_add``), by boolean masks (``x[mask]``, written back into a zero tensor by the mask) or
  by sorting (``x[argsort(choices)].split(counts)``, Switch-style without capacity).
* :class:`MoEClassifier`: embedding (plus a learned table of positions, a bare parameter, unless
  ``pos=False``), one attention layer, a MoE block, mean pooling, a linear
  head: ``(N, C)`` logits.
* :class:`MoELM`: the same with a causal attention layer and a head per token: ``(N, T, V)``.
* :class:`Split`: a plain batch split: a stem, then ``x[mask]`` through one branch and
  ``x[~mask]`` through another, recombined by the masks.
"""

from __future__ import annotations

import torch
from torch import nn

F = nn.functional


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def expert(d: int, h: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d, d)
    if kind == "swiglu":
        return SwiGLU(d, h)
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


class MoE(nn.Module):
    """A mixture-of-experts block (see the module docstring); ``force``: an expert index every
    token is routed to (the router's weights still scale the outputs), ``None``: the router's
    choice."""

    def __init__(self, d: int, h: int, E: int, k: int = 1, dispatch: str = "index",
                 kind: str = "mlp"):
        super().__init__()
        self.router = nn.Linear(d, E)
        self.experts = nn.ModuleList(expert(d, h, kind) for _ in range(E))
        self.k, self.dispatch = k, dispatch
        self.force: int | None = None

    def forward(self, x):
        shape = x.shape
        f = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(f), -1)
        w, sel = probs.topk(self.k, -1)  # (R, k)
        if self.force is not None:
            sel = torch.full_like(sel, self.force)
            sel[:, 1:] = -1  # top-1 only
        if self.k > 1:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(f)
        if self.dispatch == "sort":
            return self._sorted(f, w, sel, out).reshape(shape)
        for e, ex in enumerate(self.experts):
            hit = sel == e  # (R, k)
            if self.dispatch == "index":
                tok, slot = torch.where(hit)
                y = ex(f[tok]) * w[tok, slot].unsqueeze(-1)
                out = out.index_add(0, tok, y)
            else:
                m = hit.any(-1)
                gate = (w * hit).sum(-1)
                y = ex(f[m]) * gate[m].unsqueeze(-1)
                part = torch.zeros_like(f)
                part[m] = y
                out = out + part
        return out.reshape(shape)

    def _sorted(self, f, w, sel, out):
        """Rows sorted by expert (``argsort`` of the choices), cut per expert by ``split``, the
        outputs added back at their tokens."""
        flat = sel.reshape(-1)  # (R k,): choice j of token r at r k + j
        order = torch.argsort(flat, stable=True)
        tok = torch.div(order, self.k, rounding_mode="floor")
        counts = torch.bincount(flat[flat >= 0], minlength=len(self.experts)).tolist()
        keep = int(sum(counts))
        parts = f[tok[-keep:] if keep < len(order) else tok].split(counts)
        gates = w.reshape(-1)[order][-keep:] if keep < len(order) else w.reshape(-1)[order]
        y = torch.cat([ex(p) for ex, p in zip(self.experts, parts)])
        return out.index_add(0, tok[-keep:] if keep < len(order) else tok, y * gates.unsqueeze(-1))


class _Encoder(nn.Module):
    def __init__(self, V: int, d: int, T: int, causal: bool, pos: bool):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d)) if pos else None
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.causal = causal

    def forward(self, ids):
        T = ids.shape[1]
        h = self.emb(ids)
        if self.pos is not None:
            h = h + self.pos  # (a learned table of T positions)
        mask = None
        if self.causal:
            mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), 1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.ln(h + a)


class MoEClassifier(nn.Module):
    """Embedding, attention, a MoE block (residual), mean pooling, a linear head."""

    def __init__(self, V=11, d=8, h=12, E=4, k=1, C=3, T=6, dispatch="index", kind="mlp",
                 pos=True):
        super().__init__()
        self.enc = _Encoder(V, d, T, False, pos)
        self.moe = MoE(d, h, E, k, dispatch, kind)
        self.head = nn.Linear(d, C)

    def forward(self, ids):
        h = self.enc(ids)
        h = h + self.moe(h)
        return self.head(h.mean(1))


class MoELM(nn.Module):
    """Embedding, causal attention, a MoE block (residual), a head per token."""

    def __init__(self, V=11, d=8, h=12, E=4, k=1, T=6, dispatch="index", kind="mlp",
                 pos=True):
        super().__init__()
        self.enc = _Encoder(V, d, T, True, pos)
        self.moe = MoE(d, h, E, k, dispatch, kind)
        self.head = nn.Linear(d, V)

    def forward(self, ids):
        h = self.enc(ids)
        return self.head(h + self.moe(h))


class Split(nn.Module):
    """A stem, then the samples with ``x[:, 0] > 0`` through branch ``a`` (an MLP), the others
    through ``b`` (a linear layer), recombined by the masks."""

    def __init__(self, D=6, H=10, C=4):
        super().__init__()
        self.stem = nn.Linear(D, H)
        self.a = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C))
        self.b = nn.Linear(H, C)
        self.C = C

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        m = x[:, 0] > 0
        out = h.new_zeros(x.shape[0], self.C)
        out[m] = self.a(h[m])
        out[~m] = self.b(h[~m])
        return out
