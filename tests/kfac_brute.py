"""Float64 brute force of KFAC and EKFAC for ``nn.Linear`` and ``nn.Conv2d`` layers, from the
definitions of docs/structured.md ("KFAC", "EKFAC"), one (row, column) pair at a time.

Every call of a trainable layer is recorded by a forward hook (its input and output). For a pair
``q`` (a valid row and one column ``u`` of its core factor: ``sqrt(p_c) (e_c - p)`` for EXACT,
the observed score for EMPIRICAL) the gradient ``g_{q,t}`` at every output position of every call
comes from one backward of ``u`` placed on that row alone; the inputs ``a_{n,t}`` are the layer
inputs (a convolution's: ``F.unfold`` patches) with a 1 appended for a bias. Then

* ``expand``: ``A = sum w a a^T / sum w``, ``G = sum_q sum_t g g^T``;
* ``reduce``: ``A = (1/N) sum_n abar_n abar_n^T`` (``abar_n`` the ``w``-weighted mean of sample
  ``n``'s positions over all calls), ``G = sum_q (sum_t g)(sum_t g)^T``;
* EKFAC: ``D = sum_q (U_G^T M_q U_A)^2`` with ``M_q = sum_t g_{q,t} a_t^T`` in a given basis;

with the position weights ``w`` of an attention mask for a Linear whose input is ``(N, T, I)``
with the mask's shape, 1 elsewhere; ``reduction="mean"`` divides ``G`` and ``D`` by the rows.
The result is a ``(P, P)`` matrix in the order of the model's trainable parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad]


def _inputs(m, x):
    """``(N, T, I')`` inputs of one call."""
    if isinstance(m, nn.Conv2d):
        pad = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
        a = F.unfold(x.detach(), m.weight.shape[-2:], m.dilation, pad, m.stride).transpose(1, 2)
    else:
        a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
    if m.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], -1)
    return a.double()


def _outputs(m, g):
    """``(N, T, O)`` gradients at the output of one call."""
    if isinstance(m, nn.Conv2d):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def pairs(model, batch, fim_type, logits, labels, ignore=-100):
    """``(layers, inputs per layer per call, [(sample, gradients per layer per call)] per pair,
    rows)``."""
    layers = _layers(model)
    rec = {i: [] for i in range(len(layers))}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: rec[i].append((inp[0], out)))
             for i, (_, m) in enumerate(layers)]
    try:
        z = logits(model, batch)
    finally:
        for h in hooks:
            h.remove()
    C, N = z.shape[-1], z.shape[0]
    flat, yf = z.reshape(-1, C), labels.reshape(-1)
    per = flat.shape[0] // N
    outs = [o for i in range(len(layers)) for _, o in rec[i]]
    a_in = [[_inputs(m, x) for x, _ in rec[i]] for i, (_, m) in enumerate(layers)]
    out, rows = [], 0
    for r in range(flat.shape[0]):
        if yf[r] == ignore:
            continue
        rows += 1
        p = torch.softmax(flat[r].detach().double(), -1)
        cols = (p.sqrt()[:, None] * (torch.eye(C, dtype=p.dtype) - p)) if fim_type == "exact" \
            else (p - F.one_hot(yf[r], C).double())[None]
        for u in cols:
            cot = torch.zeros_like(flat)
            cot[r] = u.to(flat.dtype)
            gs = iter(torch.autograd.grad(flat, outs, cot, retain_graph=True, allow_unused=True))
            per_layer = []
            for i, (_, m) in enumerate(layers):
                calls = []
                for _, o in rec[i]:
                    g = next(gs)
                    g = torch.zeros_like(o) if g is None else g
                    calls.append(_outputs(m, g)[r // per].double())
                per_layer.append(calls)
            out.append((r // per, per_layer))
    return layers, a_in, out, rows


def _weights(a, w, m):
    if w is not None and not isinstance(m, nn.Conv2d) and tuple(a.shape[:2]) == tuple(w.shape):
        return w.double()
    return torch.ones(a.shape[:2], dtype=torch.float64)


def kfac(model, batches, approx="expand", fim_type="exact", reduction="sum", logits=None,
         labels=None, weights=None, basis=None):
    """The ``(P, P)`` KFAC matrix (``basis=[(U_A, U_G)]`` per layer: EKFAC's in that basis)."""
    logits = logits or (lambda m, b: m(b[0]))
    labels = labels or (lambda b: b[1])
    tot: dict = {}
    rows = 0
    for b in batches:
        layers, a_in, ps, r = pairs(model, b, fim_type, logits, labels(b))
        rows += r
        w = weights(b) if weights else None
        for i, (name, m) in enumerate(layers):
            t = tot.setdefault(i, {"name": name, "m": m, "A": 0, "M": 0, "G": 0, "D": 0})
            ws = [_weights(a, w, m) for a in a_in[i]]
            if approx == "expand":
                for a, wa in zip(a_in[i], ws):
                    t["A"] = t["A"] + torch.einsum("nt,nti,ntj->ij", wa, a, a)
                    t["M"] += float(wa.sum())
            else:
                a, wa = torch.cat(a_in[i], 1), torch.cat(ws, 1)
                ab = (wa[..., None] * a).sum(1) / wa.sum(1, keepdim=True)
                t["A"], t["M"] = t["A"] + ab.T @ ab, t["M"] + ab.shape[0]
            for n, cg in ps:
                g = torch.cat(cg[i], 0)
                if basis is not None:
                    UA, UG = basis[i]
                    M = g.T @ torch.cat(a_in[i], 1)[n]
                    t["D"] = t["D"] + (UG.T.double() @ M @ UA.double()) ** 2
                elif approx == "expand":
                    t["G"] = t["G"] + g.T @ g
                else:
                    s = g.sum(0)
                    t["G"] = t["G"] + torch.outer(s, s)
    div = rows if reduction == "mean" else 1
    blocks = []
    for i, t in tot.items():
        if basis is not None:
            U = torch.kron(basis[i][1].double(), basis[i][0].double())
            blocks.append((t["name"], t["m"], U @ torch.diag(t["D"].reshape(-1) / div) @ U.T))
        else:
            G, A = (t["G"] / div).contiguous(), (t["A"] / t["M"]).contiguous()
            blocks.append((t["name"], t["m"], torch.kron(G, A)))
    return _dense(model, blocks)


def _dense(model, blocks):
    sizes = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    offs, o = {}, 0
    for n, s in sizes:
        offs[n], o = o, o + s
    out = torch.zeros(o, o, dtype=torch.float64)
    for name, m, blk in blocks:
        pre = f"{name}." if name else ""
        O, I = m.weight.shape[0], m.weight[0].numel()  # noqa: E741
        idx = torch.empty(O, I + (m.bias is not None), dtype=torch.long)
        idx[:, :I] = offs[pre + "weight"] + torch.arange(O * I).reshape(O, I)
        if m.bias is not None:
            idx[:, I] = offs[pre + "bias"] + torch.arange(O)
        idx = idx.reshape(-1)
        out[idx[:, None], idx[None, :]] = blk
    return out


def dense_exact(model, inputs) -> torch.Tensor:
    """``(P, P)``: ``sum_r J_r^T (diag p - p p^T) J_r`` over the rows of ``model(x)`` for each
    ``x`` of ``inputs`` (the exact categorical Fisher of the trainable parameters, by autograd)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    out = 0
    for x in inputs:
        z = model(x)
        for r in range(z.shape[0]):
            J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                z[r, c], ps, retain_graph=True)]) for c in range(z.shape[-1])])
            p = torch.softmax(z[r].detach(), -1)
            out = out + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return out
