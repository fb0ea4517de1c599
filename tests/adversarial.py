"""A float64 oracle of every step of an estimator, for models that change between steps.

:func:`run` steps a :class:`fimfast.DiagFisher` over batches and, after each step, forms that
step's diagonal independently: the model's forward at that step (the same dropout masks: the
default generator is replayed), every valid row's Jacobian from the whole batch's graph, and the
quantity of the estimator with the same draws (the labels MONTE_CARLO drew and the probes of the
HUTCHINSON types, from the reference generator at the estimator's seed and offset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fimfast
from fimfast.ops.torch_ref import probe_logit_grad_torch

_MODES = {"hutchinson": "hutchinson", "hutchinson_dg": "dg"}


def _logits(model, batch, logits_fn):
    z = logits_fn(model, batch) if logits_fn is not None else model(batch[0])
    return z[0] if isinstance(z, tuple) else z


def jacobian_rows(model, batch, logits_fn: Callable | None = None, ignore_index: int = -100,
                  rows: list[int] | None = None):
    """``(names, shapes, J (R, C, P) float64, z (R, C) float64)`` of the valid rows of ``batch``
    (labels not ``ignore_index``, or ``rows`` of the flattened logits), from the model as it is
    (its modules' backward hooks off, its buffers put back after the forward)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    bufs = [b.detach().clone() for b in model.buffers()]
    hooks = [(m, m._backward_hooks, m._backward_pre_hooks) for m in model.modules()]
    for m, _, _ in hooks:
        m._backward_hooks = type(m._backward_hooks)()
        m._backward_pre_hooks = type(m._backward_pre_hooks)()
    # the lookup's own derivative: scale_grad_by_freq only divides autograd's gradient by token
    # counts over the whole batch (as tests/oracle.py:row_jacobians; fimfast's step guards too)
    scaled = [m for m in model.modules() if isinstance(m, (torch.nn.Embedding,
              torch.nn.EmbeddingBag)) and m.scale_grad_by_freq]
    for m in scaled:
        m.scale_grad_by_freq = False
    try:
        with torch.enable_grad():
            z = _logits(model, batch, logits_fn)
    finally:
        for m, bh, bph in hooks:
            m._backward_hooks, m._backward_pre_hooks = bh, bph
    C = z.shape[-1]
    flat = z.reshape(-1, C)
    if rows is None and len(batch) < 2:  # no labels: every row
        rows = list(range(flat.shape[0]))
    elif rows is None:
        rows = (batch[1].reshape(-1) != ignore_index).nonzero().squeeze(-1).tolist()
    J = []
    for r in rows:
        Jr = []
        for c in range(C):
            g = torch.autograd.grad(flat[r, c], params, retain_graph=True, allow_unused=True)
            g = [gi.to_dense() if gi is not None and gi.is_sparse else gi for gi in g]
            Jr.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                 for p, gi in zip(params, g)]).double())
        J.append(torch.stack(Jr))
    for m in scaled:
        m.scale_grad_by_freq = True
    with torch.no_grad():
        for b, v in zip(model.buffers(), bufs):
            b.copy_(v)
    return ([n for n, _ in named], [p.shape for _, p in named], torch.stack(J),
            flat[rows].detach().double())


def step_oracle(model, batch, fim_type: str, seed: int, offset: int, num_probes: int = 1,
                ignore_index: int = -100, logits_fn: Callable | None = None) -> dict:
    """The diagonal of one step of ``fim_type`` on ``batch`` (``{name: float64 tensor}``), from
    ``model`` as it is now (the function of the model: its modules' backward hooks off); buffers
    are put back after its forward."""
    rows = jacobian_rows(model, batch, logits_fn, ignore_index)
    y = batch[1].reshape(-1)
    return rows_oracle(rows, y[y != ignore_index], fim_type, seed, offset, num_probes)


def rows_oracle(rows: tuple, labels: torch.Tensor, fim_type: str, seed: int, offset: int,
                num_probes: int = 1, top_k: int = 2) -> dict:
    """:func:`step_oracle` from the :func:`jacobian_rows` ``rows`` and the valid rows' labels.
    HUTCHINSON and HUTCHINSON_DG draw their probes from the reference generator; HUTCHINSON_SQRT,
    _RANKK and _RANK1 take the library's probe factor at the float64 logits (the cotangent of
    SQRT formed in float64 from its signs, ``w - p sum(w)`` with ``w = sqrt(p) sign``)."""
    names, shapes, J, zr = rows
    C = zr.shape[-1]
    p = torch.softmax(zr, -1)
    if fim_type == "exact":
        M = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        out = torch.einsum("rcp,rcd,rdp->p", J, M, J)
    elif fim_type in ("empirical", "monte_carlo"):
        if fim_type == "empirical":
            u = (torch.nn.functional.one_hot(labels, C).double() - p).unsqueeze(0)
        else:
            u = probe_logit_grad_torch(zr, "mc", seed, offset, num_probes)
        out = (torch.einsum("rcp,src->srp", J, u) ** 2).sum(1).mean(0)
    else:
        if fim_type in _MODES:
            u = probe_logit_grad_torch(zr, _MODES[fim_type], seed, offset, num_probes)
        else:
            from fimfast import likelihoods
            from fimfast.types import FIMType, Options

            opts = Options(num_probes=num_probes, top_k=top_k, backend="torch")
            u = likelihoods.probe_factor(zr, FIMType(fim_type), opts, seed, offset).double()
            if fim_type == "hutchinson_sqrt":
                w = p.sqrt() * torch.sign(u)
                u = w - p * w.sum(-1, keepdim=True)
        out = (torch.einsum("rcp,src->sp", J, u) ** 2).mean(0)
    res, i = {}, 0
    for n, shape in zip(names, shapes):
        k = shape.numel()
        res[n] = out[i:i + k].reshape(shape)
        i += k
    return res


def stepped(est, model, batches: list, before: Callable | None = None):
    """Step ``est`` over ``batches`` (``before(i, model)`` first), yielding ``(batch, offset)``
    after each step (``offset``: the estimator's draw offset before it) with the default
    generator put back to its state before the step (the oracle's forward draws the step's
    dropout masks again), and to its state after the step when the caller resumes."""
    for i, b in enumerate(batches):
        if before is not None:
            before(i, model)
        state, offset = torch.get_rng_state(), est.offset
        est.step(b)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        yield b, offset
        torch.set_rng_state(after)


def run(model, batches: list, fim_type: str, before: Callable | None = None,
        logits_fn: Callable | None = None, **kw: Any):
    """``(estimator, oracle)`` after stepping ``batches``; ``before(i, model)`` runs before step
    ``i`` (changing the model). The oracle sums the steps' diagonals by parameter name."""
    est = fimfast.DiagFisher(model, fim_type, seed=kw.pop("seed", 7), **kw)
    ref: dict = {}
    for b, offset in stepped(est, model, batches, before):
        one = step_oracle(model, b, fim_type, est.seed, offset, kw.get("num_probes", 1),
                          kw.get("ignore_index", -100), logits_fn)
        for n, v in one.items():
            ref[n] = ref[n] + v if n in ref else v
    return est, ref


def max_rel(est, ref: dict) -> float:
    """The largest relative error over the parameter tensors of ``ref`` (by name; a parameter
    the estimator lacks counts as all wrong)."""
    got = dict(est.result().items())
    worst = 0.0
    for n, r in ref.items():
        g = got.get(n)
        if g is None:
            return float("inf")
        den = float(r.norm()) or 1.0
        worst = max(worst, float((g.double() - r).norm()) / den)
    return worst


def nonzero(ref: dict) -> bool:
    """Every tensor of the oracle has a nonzero entry (no vacuous comparison)."""
    return all(float(v.abs().max()) > 1e-12 for v in ref.values())
