"""Per-sample estimators (EXACT, EMPIRICAL, MONTE_CARLO): the generic path.

Every row (sample, or unmasked token) of the batch is one term of the Fisher, and each estimator is
``sum over rows r and columns k of (d (u_{k,r} . z_r) / d theta)^2`` (see
:mod:`fimfast.likelihoods`). The generic path back-propagates one cotangent per (row, column) pair
from a single forward of the whole batch, batched with ``is_grads_batched`` in chunks whose size
comes from the memory budget, and squares the per-pair parameter gradients. It works for any model
autograd can differentiate (rows that interact, as in attention over tokens, included) and is the
reference every faster rule is tested against; its cost is one backward per (row, column) pair.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fimfast import _env


def _batched_grads(flat, params, cot, retain_graph: bool):
    """``autograd.grad`` with a batch of cotangents; a loop where vmap cannot batch an op."""
    try:
        return torch.autograd.grad(
            flat,
            params,
            grad_outputs=cot,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        per = [
            torch.autograd.grad(flat, params, grad_outputs=c, retain_graph=True, allow_unused=True)
            for c in cot
        ]
        return [
            None if per[0][i] is None else torch.stack([g[i] for g in per])
            for i in range(len(params))
        ]


def pair_chunk(R: int, C: int, params: list[torch.Tensor], budget: int | None = None) -> int:
    """(row, column) pairs per batched backward so that gradients and cotangents fit the budget."""
    budget = _env.memory_budget_bytes() if budget is None else budget
    per_pair = 4 * (sum(p.numel() for p in params) + R * C) * 2
    return max(1, budget // max(1, per_pair))


def accumulate_columns(
    flat: torch.Tensor,
    params: list[torch.Tensor],
    columns: Iterable[torch.Tensor],
    acc: list[torch.Tensor],
    chunk: int | None = None,
) -> None:
    """Add ``sum_{k,r} (grad_theta (u_{k,r} . z_r))^2`` into ``acc``.

    Args:
        flat: ``(R, C)`` valid rows of the logits, attached to the graph (kept after the call).
        params: trainable parameters, in the order of ``acc``.
        columns: iterable of ``(K, R, C)`` column blocks ``u``.
        acc: zero-initialised float32/float64 temporaries, updated in place.
        chunk: (row, column) pairs per batched backward (default: from the memory budget).
    """
    R, C = flat.shape
    chunk = pair_chunk(R, C, params) if chunk is None else chunk
    for cols in columns:
        # pairs (k, r) with a non-zero column, in row-major order
        nz = cols.abs().sum(-1) != 0  # (K, R)
        ks, rs = nz.nonzero(as_tuple=True)
        for s in range(0, ks.numel(), chunk):
            k, r = ks[s : s + chunk], rs[s : s + chunk]
            M = k.numel()
            cot = torch.zeros(M, R, C, dtype=flat.dtype, device=flat.device)
            cot[torch.arange(M, device=flat.device), r] = cols[k, r].to(flat.dtype)
            grads = _batched_grads(flat, params, cot, retain_graph=True)
            for a, g in zip(acc, grads):
                if g is not None:  # squares in the state's dtype (float32 or wider)
                    a.add_(g.to(a.dtype).square().sum(0))
