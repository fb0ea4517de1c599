"""The independence probe: which captured calls keep the samples apart, and each tap's batch dim.

A tap's candidate batch dims are its leading dims of size ``N``. One backward column per probed
sample ``j`` (a random cotangent on the rows of ``j`` only) gives the gradient that sample's
logits send to every tap; a candidate survives if, for every probed sample, that gradient
vanishes at every other index of the candidate dim. A call with a tap that keeps no candidate
couples the samples, and its parameters take the generic path. Every sample is probed up to
:data:`PROBE_SAMPLES`; beyond, a spread of samples and random halves of the batch
(:func:`_probe_sets`), and every sample while a tap keeps two candidates; so a coupling of any two
samples (``cumsum`` over the batch, a shift) is seen. Two candidates that survive every sample
(``T == N`` with each sample's gradient confined to one position) give the same per-sample
squares, so either is exact. A step with a call on rows folded by size only (``N * k`` rows not
cut from a tensor whose dim 0 is the batch: a node list of graphs) is probed at every step
(:func:`refolds`).
"""

from __future__ import annotations

import torch

from fimfast import chunks, hooks
from fimfast.persample.generic import _batched_grads

# samples probed one by one for coupling and batch dims (all of them up to this many), and random
# halves of larger batches (see probe and _probe_sets)
PROBE_SAMPLES = 64
PROBE_SUBSETS = 32


def probe(calls: list[hooks.Call], rows, cache: dict, shape: int = 0) -> None:
    """Decide each tap's batch dimension from the data flow (and each call's verdict), once per
    structure: the verdicts are kept in ``cache`` and set again from it for the same structure
    (the same calls, layouts and graph ``shape``, :func:`fimfast.persample.walk.shape`)."""
    N = rows.num_samples
    ambiguous = any(len(t.cands) > 1 for c in calls for t in c.taps)
    key = (N, shape, tuple(
        (id(c.module), c.rule.name, c.module.training, c.data.get("stats", 0) is None,
         tuple((t.lead, t.cands, tuple(t.shape) if ambiguous else len(t.shape),
               getattr(t, "routing", None))
               for t in c.taps))
        for c in calls
    ))
    fresh = refolds(calls)
    if key in cache and not fresh:
        for c, (ok, reason, bdims) in zip(calls, cache[key]):
            c.ok, c.reason = ok, reason
            for t, b in zip(c.taps, bdims):
                t.bdim = b
        return
    taps = [t for c in calls for t in c.taps]
    passing = _surviving_dims(rows, taps)
    ki = iter(passing)
    for c in calls:
        for t in c.taps:
            good = next(ki)
            if good:
                t.bdim = good[0]
            elif c.ok:
                c.ok, c.reason = False, "its output gradients couple the samples"
    if fresh:
        return
    if len(cache) > 64:
        cache.clear()
    cache[key] = [(c.ok, c.reason, [t.bdim for t in c.taps]) for c in calls]


def refolds(calls) -> bool:
    """Whether a call is recorded on rows folded by size only
    (:mod:`fimfast.rules.fold_rows`): its verdict holds for this step's rows alone, so
    the step is probed and planned afresh, never from the caches."""
    return any(getattr(t, "refold", False) for c in calls for t in c.taps)


def _surviving_dims(rows, taps: list) -> list[list[int]]:
    """Per tap, the candidate batch dims that every probed sample's gradient is confined to."""
    N = rows.num_samples
    flat = rows.flat
    passing = [list(t.cands) for t in taps]
    gen = torch.Generator().manual_seed(0)
    vals = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
    vals = vals.to(device=flat.device, dtype=flat.dtype)
    M = chunks.probe_columns(flat, taps)
    first, rest = _probe_sets(N, gen)
    for sets in (first, rest):
        if sets is rest and not any(len(p) > 1 for p in passing):
            break  # all samples one by one only while a tap keeps two candidates
        sets = sets.to(flat.device)
        for s0 in range(0, sets.shape[0], M):
            allow = sets[s0 : s0 + M]  # (m, N): the samples each column puts a cotangent on
            sel = allow.index_select(1, rows.sample)  # (m, R)
            cot = vals.unsqueeze(0) * sel.unsqueeze(-1).to(vals.dtype)
            grads = _batched_grads(flat, [t.handle for t in taps], cot, retain_graph=True)
            for k, g in enumerate(grads):
                if g is not None and passing[k]:
                    passing[k] = [d for d in passing[k] if _confined(g, d, allow)]
    return passing


def _probe_sets(N: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's columns as ``(M, N)`` sample sets: ``(first, rest)``.

    Up to :data:`PROBE_SAMPLES` samples, ``first`` is every sample alone and ``rest`` is empty.
    Beyond, ``first`` is an even spread of ``PROBE_SAMPLES // 2`` samples alone plus
    :data:`PROBE_SUBSETS` random halves of the batch (a coupling of any two samples escapes each
    half with probability 3/4, all of them with ``(3/4)^32 < 1e-4``), and ``rest`` is every other
    sample alone (probed while a tap still has two candidate batch dims)."""
    eye = torch.eye(N, dtype=torch.bool)
    if N <= PROBE_SAMPLES:
        return eye, eye[:0]
    spread = torch.linspace(0, N - 1, PROBE_SAMPLES // 2).round().long().unique()
    halves = torch.rand(PROBE_SUBSETS, N, generator=gen) < 0.5
    others = torch.ones(N, dtype=torch.bool)
    others[spread] = False
    return torch.cat([eye[spread], halves]), eye[others]


def _confined(g: torch.Tensor, d: int, allow: torch.Tensor) -> bool:
    """Whether ``g[m]`` (``g``: ``(M, *shape)``) vanishes at every index of its dim ``d`` that
    ``allow[m]`` (``(M, N)`` bool) leaves out, for every ``m``."""
    M = g.shape[0]
    gm = g.movedim(d + 1, 1)
    mag = gm.reshape(M, gm.shape[1], -1).abs().sum(-1)  # (M, N); NaN counts as non-zero
    return not bool((mag.masked_fill(allow, 0) != 0).any())

