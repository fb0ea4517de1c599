"""A float64 oracle of the random structured Fisher matrices (docs/structured.md), with the
draws the accumulator made.

A pass draws its columns from the counter-based generator (:mod:`fimfast.ops.rng`) at the seed
and at an offset that starts at 0 and advances by ``2 S R C`` counters per batch (``R`` valid
rows, ``C`` classes), over the factor pass and then EKFAC's refit pass. The columns ``u`` are
formed here from their definitions, scaled ``1/sqrt(S)``:

* MONTE_CARLO: ``e_yhat - p`` with ``yhat`` the inverse CDF of ``p`` at the uniform of counter
  ``offset + s R + r`` (one column per row and draw);
* the HUTCHINSON family: :func:`adversarial_bounds.factor` (one column per probe, all rows).

From them: the dense matrix ``sum_q g_q g_q^T`` of the parameter gradients ``g_q = J^T u_q``
(per (row, draw) for MONTE_CARLO, per probe summed over the rows for the HUTCHINSON family:
``dense``, ``low_rank``); and, per ``nn.Linear`` / ``nn.Embedding`` layer, KFAC's factors
``A = (1/M) sum_{n,t} a a^T`` (``a`` the input with an appended 1 for a bias; an embedding's:
the token frequencies) and ``G = sum_q sum_t g_{q,t} g_{q,t}^T`` (``g`` at the layer output, one
backward per pair ``q``; a convolution's ``a``: its patches, one per output location), and
EKFAC's refitted diagonal ``D = sum_q ((U_G^T M_q U_A))^2`` with ``M_q = sum_t g_{q,t} a_t^T``
per pair (a pair of the HUTCHINSON family: one sample and one probe). ``reduction="mean"``
divides ``G``, ``D`` and the dense matrix by the rows seen.
"""

from __future__ import annotations

import math

import torch
from adversarial_bounds import factor, jacobian_rows
from torch import nn

from fimfast.ops import rng


def columns(z: torch.Tensor, fim_type: str, seed: int, offset: int, S: int,
            **opts) -> torch.Tensor:
    """``(S, R, C)`` float64 columns of one batch, scaled ``1/sqrt(S)``."""
    if fim_type == "monte_carlo":
        u = rng.uniform(seed, offset, (S, z.shape[0]), torch.float64)
        p = torch.softmax(z, -1)
        cdf = torch.cumsum(p, -1)
        y = (cdf.unsqueeze(0) <= u.unsqueeze(-1)).sum(-1).clamp_max(z.shape[-1] - 1)
        cols = torch.nn.functional.one_hot(y, z.shape[-1]).double() - p
    else:
        cols = factor(z, fim_type, seed, offset, S, **opts)
    return cols / math.sqrt(S)


def _advance(S: int, R: int, C: int) -> int:
    return 2 * S * R * C


def dense(model, batches, fim_type: str, seed: int, S: int = 1, reduction: str = "sum",
          **opts) -> torch.Tensor:
    """``(P, P)`` float64: the ``dense`` (and exact ``low_rank``) representation's matrix."""
    Fm, offset, rows = 0.0, 0, 0
    for b in batches:
        _, _, J, z = jacobian_rows(model, b)
        u = columns(z, fim_type, seed, offset, S, **opts)
        if fim_type == "monte_carlo":
            g = torch.einsum("rcp,src->srp", J, u).reshape(-1, J.shape[-1])
        else:
            g = torch.einsum("rcp,src->sp", J, u)
        Fm = Fm + g.T @ g
        offset += _advance(S, z.shape[0], z.shape[1])
        rows += z.shape[0]
    return Fm / rows if reduction == "mean" else Fm


def _layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)) and m.weight.requires_grad]


def _pass(model, batches, fim_type, seed, S, offset, opts, on_pair):
    """Run every batch with the layers' inputs and outputs captured; call
    ``on_pair(layer index, g (positions, O), a (positions, I'), sample)`` for every pair's
    gradient at every layer. Returns the offset after the pass and the rows seen."""
    layers = _layers(model)
    rows_seen = 0
    for b in batches:
        seen: dict = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, i=i, seen=seen: seen.__setitem__(
            i, (inp[0], out))) for i, (_, m) in enumerate(layers)]
        try:
            with torch.enable_grad():
                z = model(b[0])
        finally:
            for h in hooks:
                h.remove()
        C = z.shape[-1]
        flat = z.reshape(-1, C)
        valid = (b[1].reshape(-1) != -100).nonzero().squeeze(-1)
        zr = flat[valid].detach().double()
        u = columns(zr, fim_type, seed, offset, S, **opts)
        N = z.shape[0]
        per_sample = (z.numel() // N) // C  # rows per sample
        outs = [seen[i][1] for i in range(len(layers))]
        pairs = []
        for s in range(S):
            if fim_type == "monte_carlo":  # one row each
                for j, r in enumerate(valid.tolist()):
                    cot = torch.zeros_like(flat)
                    cot[r] = u[s, j].to(flat.dtype)
                    pairs.append((cot, [r // per_sample]))
            else:  # the probe of every row; each sample's own gradient
                cot = torch.zeros_like(flat)
                cot[valid] = u[s].to(flat.dtype)
                pairs.append((cot, list(range(N))))
        for cot, samples in pairs:
            grads = torch.autograd.grad(flat, outs, cot, retain_graph=True, allow_unused=True)
            for i, (_, m) in enumerate(layers):
                x, out = seen[i]
                g = torch.zeros_like(out) if grads[i] is None else grads[i]
                for n in samples:
                    gn = g[n].reshape(out.shape[1], -1).T if isinstance(m, nn.Conv2d) else \
                        g[n].reshape(-1, out.shape[-1])
                    on_pair(i, gn.double(), _inputs(m, x[n]), n)
        offset += _advance(S, zr.shape[0], C)
        rows_seen += zr.shape[0]
    return offset, rows_seen


def _inputs(m, x):
    """``(positions, I')`` inputs of one sample: with a 1 appended for a bias; an embedding's
    one-hot tokens."""
    if isinstance(m, nn.Embedding):
        return torch.nn.functional.one_hot(x.reshape(-1), m.num_embeddings).double()
    if isinstance(m, nn.Conv2d):  # the patches of the output locations
        a = torch.nn.functional.unfold(x.unsqueeze(0).detach(), m.kernel_size, m.dilation,
                                       m.padding, m.stride)[0].T.double()
    else:
        a = x.reshape(-1, x.shape[-1]).detach().double()
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if m.bias is not None \
        else a


def kfac(model, batches, fim_type: str, seed: int, S: int = 1, reduction: str = "sum",
         refit=None, **opts):
    """``{weight name: (A, G)}`` (an embedding's ``A``: the frequency vector); with ``refit =
    {weight name: (U_A, U_G)}`` also EKFAC's ``{weight name: D}`` from a second pass."""
    layers = _layers(model)
    names = [f"{n}.weight" if n else "weight" for n, _ in layers]
    G = [0.0] * len(layers)

    def add(i, g, a, n):
        G[i] = G[i] + g.T @ g

    offset, rows = _pass(model, batches, fim_type, seed, S, 0, opts, add)
    A = []
    for (_, m) in layers:
        acts = []
        hook = m.register_forward_hook(lambda mod, inp, out, acts=acts: acts.append(inp[0]))
        try:
            with torch.no_grad():
                for b in batches:
                    model(b[0])
        finally:
            hook.remove()
        a = torch.cat([_inputs(m, xn) for x in acts for xn in x])
        A.append(a.sum(0) / a.shape[0] if isinstance(m, nn.Embedding)
                 else a.T @ a / a.shape[0])
    div = rows if reduction == "mean" else 1
    out = {n: (a, g / div) for n, a, g in zip(names, A, G)}
    if refit is None:
        return out
    D = [0.0] * len(layers)

    def add_d(i, g, a, n):
        UA, UG = refit[names[i]]
        M = g.T @ a  # the pair's gradient of [W, b] (O, I'), or of W^T for an embedding
        R = UG.T.double() @ M
        D[i] = D[i] + (R if UA is None else R @ UA.double()) ** 2  # an embedding's U_A: I

    _pass(model, batches, fim_type, seed, S, offset, opts, add_d)
    return out, {n: d / div for n, d in zip(names, D)}
