"""One-backward estimators: the HUTCHINSON family (math.md §2).

Forward once; ``u = dh/dz`` from :func:`fimfast.likelihoods.probe_factor`; one
``torch.autograd.grad`` per probe from the logits; the squares accumulate in float32. No hooks, no
per-sample machinery: any architecture autograd differentiates works.
"""

from __future__ import annotations

import torch

from fimfast import ops
from fimfast.likelihoods import probe_factor
from fimfast.types import FIMType, Options


def estimate(
    flat: torch.Tensor,
    params: list[torch.Tensor],
    fim_type: FIMType,
    opts: Options,
    seed: int,
    offset: int,
    acc: list[torch.Tensor],
    retain_graph: bool = False,
) -> None:
    """Add this batch's HUTCHINSON-family estimate (mean over probes) into ``acc``.

    Args:
        flat: ``(R, C)`` valid rows of the logits, attached to the graph.
        params: trainable parameters, in the order of ``acc``.
        fim_type: one of the HUTCHINSON types.
        opts: validated options.
        seed: generator seed; offset: first counter of this step.
        acc: float32/float64 zero-initialised temporaries, one per parameter, updated in place.
        retain_graph: keep the graph after the last probe (``train_step`` back-propagates the loss
            through it afterwards).
    """
    u = probe_factor(flat, fim_type, opts, seed, offset)  # (S, R, C)
    S = u.shape[0]
    if fim_type == FIMType.HUTCHINSON_SQRT:
        logp = torch.log_softmax(flat, dim=-1)
    for s in range(S):
        keep = retain_graph or s < S - 1
        if fim_type == FIMType.HUTCHINSON_SQRT:
            h = (u[s].to(logp.dtype) * logp).sum()
            grads = torch.autograd.grad(h, params, retain_graph=keep, allow_unused=True)
        else:
            grads = torch.autograd.grad(
                flat,
                params,
                grad_outputs=u[s].to(flat.dtype),
                retain_graph=keep,
                allow_unused=True,
            )
        used = [(a, g) for a, g in zip(acc, grads) if g is not None]
        if used:
            ops.accumulate_(
                [a for a, _ in used],
                [g for _, g in used],
                "sum",
                scale=1.0 / S,
                backend=opts.backend,
            )
