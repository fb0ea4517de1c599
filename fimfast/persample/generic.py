"""The generic path: one backward per (row, column) pair, batched with ``is_grads_batched``.

It works for any model autograd can differentiate and is the reference every rule is tested
against; :func:`_batched_grads` is also the batched backward of the fast path and of the probe.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fimfast.chunks import pair_chunk
from fimfast.hutchinson import vjp
from fimfast.persample import stream


def _batched_grads(flat, params, cot, retain_graph: bool):
    """``autograd.grad`` with a batch of cotangents (:func:`.stream.batched_grads`); a loop
    where vmap cannot batch an op.

    ``retain_graph=False`` frees the graph's buffers as the backward goes (one column only: a
    batched backward that fails part-way must be able to run again as a loop)."""
    if cot.shape[0] == 1:  # one column: no vmap (its set-up costs more than a small backward)
        # autograd.grad, run by the engine directly where it would check and convert nothing
        grads = vjp(flat, params, cot[0], retain_graph, False)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        return stream.batched_grads(flat, params, cot, True)
    except RuntimeError:
        per = [
            torch.autograd.grad(flat, params, grad_outputs=c, retain_graph=True, allow_unused=True)
            for c in cot
        ]
        return [
            None if per[0][i] is None else torch.stack([g[i] for g in per])
            for i in range(len(params))
        ]


def accumulate_columns(
    flat: torch.Tensor,
    params: list[torch.Tensor],
    columns: Iterable[torch.Tensor],
    acc: list[torch.Tensor],
    chunk: int | None = None,
    group: torch.Tensor | None = None,
) -> None:
    """Add ``sum_{k,r} (grad_theta (u_{k,r} . z_r))^2`` into ``acc`` (with ``group``, the
    ``(R,)`` sample of each row: ``sum_{k,n} (grad_theta sum_{r in n} u_{k,r} . z_r)^2``).

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
        if group is not None:  # one pair per (column, sample): its rows' columns together
            G = int(group.max()) + 1
            hits = torch.zeros(cols.shape[0], G, dtype=cols.dtype, device=cols.device)
            hits.index_add_(1, group, cols.abs().sum(-1))
            nz = hits != 0
        else:  # pairs (k, r) with a non-zero column, in row-major order
            nz = cols.abs().sum(-1) != 0  # (K, R)
        ks, rs = nz.nonzero(as_tuple=True)
        for s in range(0, ks.numel(), chunk):
            k, r = ks[s : s + chunk], rs[s : s + chunk]
            M = k.numel()
            if group is not None:
                sel = (group.unsqueeze(0) == r.unsqueeze(1)).unsqueeze(-1)  # (M, R, 1)
                cot = (cols[k] * sel).to(flat.dtype)
                grads = _batched_grads(flat, params, cot, retain_graph=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.to(a.dtype).square().sum(0))
                continue
            cot = torch.zeros(M, R, C, dtype=flat.dtype, device=flat.device)
            cot[torch.arange(M, device=flat.device), r] = cols[k, r].to(flat.dtype)
            grads = _batched_grads(flat, params, cot, retain_graph=True)
            for a, g in zip(acc, grads):
                if g is not None:  # squares in the state's dtype (float32 or wider)
                    a.add_(g.to(a.dtype).square().sum(0))
