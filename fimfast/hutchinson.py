"""One-backward estimators: the HUTCHINSON family (docs/math.md §5).

Forward once; for every probe, the cotangent ``u = dh/dz`` of all valid rows is written into one
buffer shaped like the logits, and one ``torch.autograd.grad`` from the logits gives ``grad h``,
whose squares accumulate in float32 (float64 for float64 models). No hooks, no per-sample
machinery: any architecture autograd differentiates works (gradient checkpointing and
``torch.compile`` included).

Memory (large output heads, e.g. an LM head with V = 50k classes): beyond the logits the model's
forward produced, a step holds **one** tensor shaped like the logits (the cotangent, in the
logits' dtype, reused by every probe) and float32 temporaries for at most ``_CHUNK_ELEMS`` logits
at a time: the probes are formed row chunk by row chunk through
:func:`fimfast.ops.probe_logit_grad`, with the counters the whole-batch call would use, so the
signs are identical to one call on all rows. No ``(S, R, C)`` tensor and no float32 copy of
bf16/fp16 logits is made. With the option ``lm_head`` neither the logits nor that buffer exist
(:mod:`fimfast.lm_head`). A batch whose rows are all valid and fit in one chunk (at most
``_CHUNK_ELEMS`` logits) needs no buffer: its probe, in the logits' dtype, is the cotangent.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch

from fimfast import _ext, chunks, hooks, ops
from fimfast.batch import Rows
from fimfast.dtypes import compute_dtype
from fimfast.likelihoods import diagonal_topk, effective_top_k
from fimfast.ops.softmax_rest import mix_at
from fimfast.step import Squares, Step
from fimfast.types import FIMType, Options

# float32 logits per chunk of probe rows: 1M entries (4 MiB) keeps each chunk's softmax, signs and
# mix in the last-level cache and bounds the temporaries whatever the vocabulary
_CHUNK_ELEMS = 1 << 20

_PROBE_MODE = {
    FIMType.HUTCHINSON: "hutchinson",
    FIMType.HUTCHINSON_SQRT: "sqrt",
    FIMType.HUTCHINSON_DG: "dg",
}


def rows_per_chunk(C: int, elems: int | None = None) -> int:
    """Rows of ``C`` logits per probe chunk (at least 1; ``elems`` defaults to ``_CHUNK_ELEMS``)."""
    return chunks.rows_per_chunk(C, _CHUNK_ELEMS if elems is None else elems)


def estimate(step: Step, cap: None = None) -> list[torch.Tensor] | Squares:
    """This batch's HUTCHINSON-family estimate (mean over probes), one tensor per parameter.

    The estimate path of the HUTCHINSON types (the contract: :mod:`fimfast.step`).

    Args:
        step: the step (``step.fim_type`` one of the HUTCHINSON types; ``step.rows`` the valid
            rows, logits attached).
        cap: unused (no capture: one plain backward per probe).

    Returns:
        Sums over the rows of the squared probe gradients, averaged over the probes, shaped like
        the parameters, in ``step.dtypes`` (zeros for parameters the logits do not depend on);
        with one probe and ``step.defer_square``, the probe gradients as :class:`Squares`.
    """
    rows, params, opts = step.rows, step.params, step.opts
    logits = rows.logits
    S = opts.num_probes
    factor = _Factor(rows, step.fim_type, opts, step.seed, step.offset)
    # every row valid and in one chunk: the probe of all rows is the cotangent itself (in the
    # logits' dtype: no buffer to fill); otherwise the one (tokens x C) buffer of the step, filled
    # chunk by chunk, where rows left out (padding, ignored) stay zero
    whole = rows.all_valid and factor.chunk >= factor.R
    if not whole:
        cot = (torch.empty if rows.all_valid else torch.zeros)(
            logits.shape, dtype=logits.dtype, device=logits.device
        )
        cot_flat = cot.view(-1, rows.num_classes)
    reentrant = has_reentrant_checkpoint(logits)
    acc: list[torch.Tensor | None] = [None] * len(params)
    for s in range(S):
        if whole:
            cot = factor.whole(s)
            if cot.dtype != logits.dtype:
                cot = cot.to(logits.dtype)
            if logits.dim() != 2:
                cot = cot.view(logits.shape)
        else:
            factor.write(s, cot_flat)
        keep = step.retain_graph or s < S - 1
        grads = vjp(logits, params, cot, keep, reentrant)
        if S == 1 and step.defer_square:  # the state squares and adds in one pass
            return squares(grads, cot, step.dtypes, opts.backend)
        accumulate_squares(acc, grads, step.dtypes, 1.0 / S, cot, opts.backend)
    del cot
    return step.filled(acc)


def squares(
    grads: list[torch.Tensor | None], cot: torch.Tensor, dtypes: list[torch.dtype], backend: str
) -> Squares:
    """One probe's gradients ``grads`` (from the cotangent ``cot``) as the :class:`Squares` a
    state folds in; which of them it may square in place is found only if it asks (a state
    still at zero)."""
    owned = functools.partial(_owned, grads, dtypes, cot.untyped_storage().data_ptr())
    return Squares(grads, owned, dtypes, 1.0, backend)


class _Factor:
    """``u = dh/dz`` of one probe for the valid rows, written chunk by chunk into a buffer."""

    def __init__(self, rows: Rows, fim_type: FIMType, opts: Options, seed: int, offset: int):
        self.rows = rows
        self.fim_type = fim_type
        self.opts = opts
        self.seed = seed
        self.offset = offset
        self.R = rows.count
        self.C = rows.num_classes
        self.rankk = fim_type in (FIMType.HUTCHINSON_RANKK, FIMType.HUTCHINSON_RANK1)
        self.k = effective_top_k(fim_type, opts)
        # the secular solver holds about four (rows, k, C) temporaries per iteration
        self.chunk = rows_per_chunk(self.C * (4 * self.k if self.rankk else 1))
        # eigenpairs of the core FIM do not depend on the probe: keep them across probes when
        # they are small, recompute them per chunk otherwise
        self._eig: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if opts.num_probes > 1 and self.R * self.k * self.C <= 4 * _CHUNK_ELEMS else None
        )

    def write(self, s: int, out: torch.Tensor) -> None:
        """Write probe ``s`` into ``out`` (``(N*T, C)``, rows of ``rows.index``)."""
        rows = self.rows
        for r0 in range(0, self.R, self.chunk):
            r1 = min(self.R, r0 + self.chunk)
            u = self._chunk(s, r0, rows.rows_chunk(r0, r1).detach())
            if rows.all_valid:
                out[r0:r1].copy_(u)
            else:
                out.index_copy_(0, rows.index[r0:r1], u.to(out.dtype))

    def whole(self, s: int) -> torch.Tensor:
        """Probe ``s`` of every row, ``(R, C)``, when every row is valid (one chunk's worth)."""
        z = self.rows.detached
        return self._chunk(s, 0, z if z.dim() == 2 else z.reshape(-1, self.C))

    def _chunk(self, s: int, r0: int, z: torch.Tensor) -> torch.Tensor:
        """``(r1 - r0, C)`` float32|float64 factor of rows ``r0:r1`` for probe ``s``.

        Probe ``s`` of row ``r`` uses the counters of row ``s*R + r`` of a whole-batch call, so a
        chunked step draws exactly the signs of an unchunked one.
        """
        o = self.opts
        lk = o.likelihood
        if self.rankk:
            off = self.offset + (s * self.R + r0) * self.k
            eig = self._eigpairs(r0, z)
            return ops.probe_logit_grad(z, "rankk", self.seed, off, 1, eig=eig, backend=o.backend)[
                0
            ]
        off = self.offset + (s * self.R + r0) * self.C
        if lk != "categorical":  # diagonal core FIM: HUTCHINSON and DG coincide
            return ops.probe_logit_grad(
                z, lk, self.seed, off, 1, sigma2=o.sigma2, backend=o.backend
            )[0]
        mode = _PROBE_MODE[self.fim_type]
        u = ops.probe_logit_grad(z, mode, self.seed, off, 1, backend=o.backend)[0]
        if self.fim_type == FIMType.HUTCHINSON_SQRT:
            # h = sum_c w_c log p_c(z): its gradient w - p sum(w) at the logits, as log_softmax's
            # backward forms it but exact at a confident row's leading class, on this chunk only
            u = mix_at(u, z)
        return u

    def _eigpairs(self, r0: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eig is not None and r0 in self._eig:
            return self._eig[r0]
        o = self.opts
        if o.likelihood == "categorical":
            p = torch.softmax(z.to(compute_dtype(z.dtype)), dim=-1)
            eig = ops.core_topk(
                p, self.k, solver=o.rankk_solver, iters=o.lr_power_itrs, backend=o.backend
            )
        else:
            eig = diagonal_topk(z, o.likelihood, o.sigma2, self.k)
        if self._eig is not None:
            self._eig[r0] = eig
        return eig


def vjp(
    logits: torch.Tensor,
    params: list[torch.Tensor],
    cot: torch.Tensor,
    retain_graph: bool,
    reentrant: bool,
) -> list[torch.Tensor | None]:
    """``grad_theta <cot, logits>`` for every parameter (``None`` where unused)."""
    if not reentrant:
        if _ENGINE is not None and _plain(logits, params, cot):
            # what torch.autograd.grad runs once it has checked its arguments: the cotangent
            # has the logits' shape and dtype and no argument has a __torch_function__
            return list(_ENGINE((logits,), (cot,), retain_graph, False, tuple(params), True,
                                accumulate_grad=False))
        return list(
            torch.autograd.grad(
                logits, params, grad_outputs=cot, retain_graph=retain_graph, allow_unused=True
            )
        )
    # reentrant torch.utils.checkpoint refuses autograd.grad and backward(inputs=...): run a plain
    # backward into .grad and give the user's gradients back untouched
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        torch.autograd.backward(logits, grad_tensors=cot, retain_graph=retain_graph)
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


# the engine call behind torch.autograd.grad (torch >= 2.4), for arguments it needs not check
_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _plain(logits: torch.Tensor, params: list[torch.Tensor], cot: torch.Tensor) -> bool:
    """Whether ``torch.autograd.grad(logits, params, cot)`` would find nothing to check or
    convert: plain tensors (no ``__torch_function__``, no active mode, not nested), ``cot``
    shaped like ``logits`` in its dtype."""
    return (
        cot.shape == logits.shape
        and cot.dtype == logits.dtype
        and not logits.is_nested
        and not torch._C._has_torch_function((logits, cot, *params))
    )


def has_reentrant_checkpoint(t: torch.Tensor) -> bool:
    """Whether the graph of ``t`` holds a reentrant ``torch.utils.checkpoint`` segment (a walk
    that stops at the first one; :func:`fimfast.hooks.walk` decides the same on the whole
    graph). With the compiled extension the walk runs in C++ (csrc/graph_walk.cpp: no Python
    object per node); otherwise here, where leaves' accumulators, which have no inputs, are not
    visited."""
    walk = _WALK[0] if _WALK else _walk()
    if walk is not None:
        return walk(t)
    return _has_reentrant_checkpoint(t)


def _walk():
    """The extension's graph walk, or ``None`` (looked up once, kept in :data:`_WALK`)."""
    _WALK.append(_ext.host_function("has_reentrant_checkpoint"))
    return _WALK[0]


_WALK: list = []


def _has_reentrant_checkpoint(t: torch.Tensor) -> bool:
    """:func:`has_reentrant_checkpoint` in Python."""
    fn = t.grad_fn
    if fn is None:
        return False
    seen, stack = {fn}, [fn]
    known, pop, push, add = hooks.REENTRANT_TYPES, stack.pop, stack.append, seen.add
    leaf = hooks._ACCUMULATE_GRAD
    while stack:
        node = pop()
        r = known.get(type(node))  # the type's verdict, decided once per type
        if r or (r is None and hooks.is_reentrant_node(node)):
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen and type(nxt) is not leaf:
                add(nxt)
                push(nxt)
    return False


def _owned(grads: list[torch.Tensor | None], dtypes: list[torch.dtype], cot: int) -> list[bool]:
    """Which gradients may be squared in place: contiguous, in their estimate's dtype, and
    sharing storage neither with the cotangent (whose storage's data pointer is ``cot``) nor with
    another gradient (a parameter used as the logits, or twice)."""
    ptrs = [
        None if g is None or g.layout != torch.strided else g.untyped_storage().data_ptr()
        for g in grads
    ]
    uses = Counter(ptrs)
    uses[cot] += 1
    return [
        p is not None  # set and dense (a sparse table gradient is read, never squared)
        and uses[p] == 1
        and g.dtype == dt
        and not g.requires_grad
        and g.is_contiguous()
        for p, g, dt in zip(ptrs, grads, dtypes)
    ]


def accumulate_squares(
    acc: list[torch.Tensor | None],
    grads: list[torch.Tensor | None],
    dtypes: list[torch.dtype],
    scale: float,
    cot: torch.Tensor,
    backend: str,
) -> None:
    """``acc[i] += scale * grads[i]**2`` (squares in ``dtypes[i]``), creating ``acc[i]`` if unset.

    The first probe squares its gradient in place when it already has the estimate's dtype and is
    not shared (no zeroed temporaries: the probe gradients are the only parameter-sized buffers).
    """
    # row-sparse table gradients (fimfast.sparse_tables) are summed over probes densely here;
    # one-probe steps add them at their rows (fimfast.state.State)
    grads = [g if g is None or g.layout == torch.strided else g.to_dense() for g in grads]
    owned = _owned(grads, dtypes, cot.untyped_storage().data_ptr())
    more_s, more_g, new = [], [], []
    for i, g in enumerate(grads):
        if g is None:
            continue
        if acc[i] is None:
            if owned[i]:
                sq = g.detach()
            else:
                sq = g.detach().to(dtypes[i], copy=True)
            new.append(sq)
            acc[i] = sq
        else:
            more_s.append(acc[i])
            more_g.append(g)
    if new:  # one foreach launch for every first square, not one per parameter
        torch._foreach_mul_(new, new)
        if scale != 1.0:
            torch._foreach_mul_(new, scale)
    if more_s:
        ops.accumulate_(more_s, more_g, "sum", scale=scale, backend=backend)
