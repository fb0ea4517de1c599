"""Layers on rows routed from the batch: mixture-of-experts layers and batch splits.

A layer called on rows gathered from the batch (``x[idx]``, ``x[mask]``, ``x.index_select(0,
idx)``: the tokens a router sent to one expert, the samples of one branch of a split) has an
input of ``M`` rows in no fixed relation to the batch, so no dim of its output is the batch and
its parameters took the generic path. Its rows' sample is read from the autograd graph of the
input at every step (:func:`rows_of`):

* the gather itself: ``IndexBackward0`` with one index on the first dims (a 1-D integer index,
  or a boolean mask of the first ``k`` dims) and ``IndexSelectBackward0`` on dim 0 keep the
  index they took, and the sample of each row is the source's sample at that index; a split or
  slice on dim 0 of routed rows (``f[order].split(counts)``: rows sorted by expert, cut per
  expert) keeps its sizes, and the rows of each part are the source's rows in that range (a
  split or slice on another dim keeps the rows: SwiGLU's ``gate, up = y.chunk(2, dim=-1)``);
* the source's samples: the output of a routed layer (known), another gather, ``torch.cat``
  of routed rows (:func:`_cat`; a ``cat`` with any other part is not read), a ``view`` /
  ``reshape`` / ``flatten`` merging its leading dims ``(N, T, d) -> (N * T, d)``, or any other
  tensor whose leading dims hold the batch: dim 0 of size ``N``, another leading dim of size
  ``N`` (sequence-first), ``N * k`` rows folded sample by sample (as
  :func:`fimfast.rules.linear.folded` reads them), or ``N`` indices in all (with 1-D labels of
  flattened ``(N * T, C)`` logits every token is a sample);
* elementwise functions of routed rows with the same rows (an expert's activation, SwiGLU's
  product of two projections of the same rows, a bias): the rows of their inputs.

Anything else (a source that is a parameter or has no gradient, an index on another dim,
several indices, rows of inputs that disagree) leaves the call to the usual layouts, which send
it to the generic path. The sample of every row is a hypothesis the independence probe checks
(:mod:`fimfast.persample.probe`), once per structure, like every tap's batch dim: the call is
recorded on a padded layout ``(N, S, ...)`` (``S``: the most rows any sample has in this call,
the rows of one sample in the order they came, zeros elsewhere), input and tap alike, so the
probe finds sample ``j``'s gradient confined to the slots of ``j`` or sends the call to the
generic path, and the rules see a layer shared by the ``S`` positions of each sample (rows of
one sample through one expert add before the square, as tokens sharing a weight do). The
layer's output itself is not changed: the tap adds a zero gathered from the padded handle.

Inside a non-reentrant ``torch.utils.checkpoint`` (saved-tensor hooks active) nothing is routed:
the padded tap saves the rows' indices, which the backward's recomputation, run without the
capture, would not save; such layers keep the usual layouts (generic path).

A call with no rows (an expert nothing was routed to) is recorded empty, its squares zero; its
structure differs from a call with rows, so the first step with rows is probed again.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from fimfast.hooks import Call, Capture, Tap, saved_tensor_hooks_active

_ACC = torch._C._functions.AccumulateGrad
_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
# autograd nodes of elementwise functions whose output rows are their inputs' rows
_ELEMENTWISE = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0",
    "MulBackward1", "DivBackward0", "DivBackward1", "NegBackward0", "CloneBackward0",
    "ToCopyBackward0", "GeluBackward0", "ReluBackward0", "SiluBackward0", "TanhBackward0",
    "SigmoidBackward0", "LeakyReluBackward0", "EluBackward0", "HardtanhBackward0",
    "SoftplusBackward0", "MishBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "NativeDropoutBackward0", "ExpBackward0", "PowBackward0",
})
_STEPS = 12  # autograd nodes one walk may visit


@dataclass
class RoutedTap(Tap):
    """The tap of a call on routed rows, on the padded layout ``(N, S, ...)``; ``empty``: no rows
    were routed to the call (part of the step's structure, see the module docstring)."""

    empty: bool = False
    leads: list | None = None  # how the forward read the batch from the sources' leading dims

    @property
    def routing(self) -> tuple:
        """What the structure key holds of a routed call: whether it has rows, and which dims of
        the gathers' sources were taken for the batch in this forward (:func:`_lead`)."""
        return self.empty, tuple(self.leads or ())


def rows_of(cap: Capture, x: torch.Tensor) -> torch.Tensor | None:
    """The sample of each row (dim 0) of ``x``, a layer input gathered from the batch, as a 1-D
    ``int64`` tensor; ``None`` when ``x`` is not such rows (see the module docstring)."""
    fn = x.grad_fn
    N = cap.samples
    if fn is None or not N or x.dim() < 2 or type(fn).__name__ not in _ROUTES:
        return None
    if saved_tensor_hooks_active():  # (see the module docstring)
        return None
    known = cap.__dict__.get("routed")
    if known is None:
        known = cap.__dict__["routed"] = {}
    s = _rows(fn, x.output_nr, N, known, [_STEPS], x.device)
    if s is None or s.dim() != 1 or s.shape[0] != x.shape[0]:
        return None
    return s


def _rows(fn, nr: int, N: int, known: dict, budget: list, dev) -> torch.Tensor | None:
    """The samples of the rows of output ``nr`` of node ``fn`` (routed rows only)."""
    hit = known.get((fn, nr))
    if hit is not None:
        return hit
    budget[0] -= 1
    if budget[0] < 0:
        return None
    name = type(fn).__name__
    if name == "IndexBackward0":
        idx = fn._saved_indices
        ix = idx[0] if idx else None
        if ix is None or any(i is not None for i in idx[1:]):
            return None
        sizes = tuple(int(s) for s in fn._saved_self_sym_sizes)
        if ix.dtype == torch.bool:
            k = ix.dim()
            if tuple(ix.shape) != sizes[:k]:
                return None
        elif ix.dim() == 1 and not ix.is_floating_point():
            k = 1
        else:
            return None
        src = _source(fn.next_functions[0], sizes, k, N, known, budget, dev)
        out = None if src is None else src[ix.to(src.device)]
    elif name == "IndexSelectBackward0":
        if fn._saved_dim != 0:
            return None
        sizes = tuple(int(s) for s in fn._saved_self_sym_sizes)
        src = _source(fn.next_functions[0], sizes, 1, N, known, budget, dev)
        out = None if src is None else src.index_select(0, fn._saved_index.to(src.device))
    elif name in _PARTS:  # of routed rows only: a slice of the batch keeps its usual layout
        src, k = fn.next_functions[0]
        dim = _dim(fn)
        if dim is None or src is None:
            return None
        src = _rows(src, k, N, known, budget, dev)  # a part on another dim: the same rows
        out = src if src is None or dim else src[_part(fn, name, nr)]
    elif name == "CatBackward0":
        out = _cat(fn, N, known, budget, dev)
    elif name in _ELEMENTWISE:
        out = None
        for nxt, k in fn.next_functions:
            if nxt is None or type(nxt) is _ACC:
                continue  # a constant or a parameter (a bias) broadcast over the rows
            s = _rows(nxt, k, N, known, budget, dev)
            if s is None or (out is not None and not (s is out or torch.equal(s, out))):
                return None
            out = s
    else:
        return None
    if out is not None:
        known[(fn, nr)] = out
    return out


def _cat(fn, N: int, known: dict, budget: list, dev) -> torch.Tensor | None:
    """The samples of the rows of ``torch.cat`` of routed rows: on dim 0 (the experts' outputs
    put together, ``torch.cat(outs)`` of rows sorted by expert) the parts' samples one after the
    other, on another dim the parts' common rows; ``None`` where a part is not routed rows."""
    parts = []
    for nxt, k in fn.next_functions:
        s = None if nxt is None or type(nxt) is _ACC else _rows(nxt, k, N, known, budget, dev)
        if s is None:
            return None
        parts.append(s)
    dim = fn._saved_dim
    if dim == 0:
        return torch.cat(parts)
    if dim < (1 << 63) and all(s is parts[0] or torch.equal(s, parts[0]) for s in parts):
        return parts[0]  # (a negative dim, saved as unsigned, may be dim 0: not read)
    return None


def _dim(fn) -> int | None:
    """The dim (``>= 0``) a split or slice cuts, ``None`` when unknown."""
    dim, sizes = fn._saved_dim, getattr(fn, "_saved_self_sym_sizes", None)
    if dim >= 1 << 63:  # a negative dim, saved as unsigned
        dim -= 1 << 64
    if dim < 0:
        dim = None if sizes is None else dim + len(sizes)
    return dim


def _part(fn, name: str, nr: int) -> slice:
    """The rows of output ``nr`` of a split or slice on dim 0, as a slice of its source's."""
    if name == "SliceBackward0":  # a negative start or end is saved as unsigned: `rows[1:-1]`
        # (its end read as 2**64 - 1 took the rows to the last; a slice of the part then gave
        # rows of other samples, off by 0.35 on the expert)
        start, end = (int(v) - (1 << 64) if v >= 1 << 63 else v
                      for v in (fn._saved_start, fn._saved_end))
        return slice(start, end, fn._saved_step)
    if name == "SplitBackward0":
        n = fn._saved_split_size
        return slice(nr * n, nr * n + n)
    sizes = fn._saved_split_sizes
    start = sum(sizes[:nr])
    return slice(start, start + sizes[nr])


def _source(edge, sizes: tuple, k: int, N: int, known: dict, budget: list, dev
            ) -> torch.Tensor | None:
    """The samples of the first ``k`` dims (``sizes[:k]``) of the source of a gather, whose
    node and output are ``edge``."""
    fn, nr = edge
    if fn is None or type(fn) is _ACC:
        return None  # no gradient, or a parameter: not rows of the batch
    if k == 1:
        s = _rows(fn, nr, N, known, budget, dev)  # rows routed already (a gather of a gather)
        if s is not None:
            return s if s.shape[0] == sizes[0] else None
        if type(fn).__name__ == "CatBackward0":
            # rows put together from parts (experts' outputs of rows sorted by expert, then
            # unsorted by a gather): their order is the data's, which the sizes cannot tell (a
            # guess of rows in the batch's order, right in a first batch routed in token order,
            # was off by 1.08 on the layer after the gather in the next)
            return None
        if type(fn).__name__ in _VIEWS:
            ins = tuple(int(s) for s in fn._saved_self_sym_sizes)
            for j in range(1, len(ins)):
                if math.prod(ins[:j]) == sizes[0] and ins[j:] == sizes[1:]:
                    s = _lead(ins[:j], N, dev, known)
                    return None if s is None else s.reshape(-1)
    return _lead(sizes[:k], N, dev, known)


def _lead(lead: tuple, N: int, dev, known: dict) -> torch.Tensor | None:
    """Sample of every index of the leading dims ``lead`` of a tensor holding the batch there:
    dim 0 of size ``N``, else another dim of size ``N``, else ``N * k`` rows sample by sample,
    else leading dims of ``N`` indices in all (``(N, T)`` tokens, each a sample of its own).

    The choice is a guess from the sizes, which the probe checks once per structure: it is noted
    in ``known[_LEADS]`` for the structure key (:attr:`RoutedTap.routing`). A sequence-first
    ``(T, N)`` source is read on dim 1, but on dim 0 in a batch with ``T == N``: without the
    choice in the key, that batch took the verdict of the first and gave each row the sample of
    its position (off by 0.28-0.6 on the experts of a sequence-first mixture-of-experts block)."""
    shape = [1] * len(lead)
    if lead[0] == N or N in lead:
        d = 0 if lead[0] == N else lead.index(N)
        how = d
        shape[d] = N
        s = torch.arange(N, device=dev)
    elif lead[0] >= N and lead[0] % N == 0:
        how = "folded"
        shape[0] = lead[0]
        s = torch.arange(lead[0], device=dev) // (lead[0] // N)
    elif math.prod(lead) == N:  # every index its own sample: tokens of flattened (N * T, C) logits
        _note(known, (len(lead), "each"))
        return torch.arange(N, device=dev).view(lead)
    else:
        return None
    _note(known, (len(lead), how))
    return s.view(shape).expand(lead)


def _note(known: dict, how: tuple) -> None:
    """Note a choice of :func:`_lead` (once: the experts of a block read the same source)."""
    leads = known.setdefault(_LEADS, [])
    if how not in leads:
        leads.append(how)


_LEADS = "leads"  # the key of known (its other keys: (node, output)) noting _lead's choices


def _slots(cap: Capture, sample: torch.Tensor, N: int) -> tuple[torch.Tensor, int]:
    """``(flat, S)``: each row's place ``sample * S + slot`` on the padded layout ``(N * S)``
    (``slot``: its position among the rows of its sample, in their order) and the most rows of
    one sample. Formed once per tensor of samples and forward: an expert's layers after its
    first read the rows the first recorded (the same tensor, :func:`record`)."""
    memo = cap.__dict__.setdefault("slots", {})
    hit = memo.get(id(sample))
    if hit is not None and hit[0] is sample:
        return hit[1], hit[2]
    M = sample.shape[0]
    if M == 0:
        flat, S = sample, 0
    elif M * N <= _ONEHOT:  # a row's rank among its sample's rows: a running count per sample
        seen = (sample.unsqueeze(1) == torch.arange(N, device=sample.device)).cumsum(0)
        slot = seen.gather(1, sample.unsqueeze(1)).squeeze(1) - 1
        S = int(seen[-1].max())
        flat = sample * S + slot
    else:
        counts = torch.bincount(sample, minlength=N)
        start = counts.cumsum(0) - counts
        order = torch.argsort(sample, stable=True)
        slot = torch.empty_like(sample)
        slot[order] = torch.arange(M, device=sample.device) - start[sample[order]]
        S = int(counts.max())
        flat = sample * S + slot
    memo[id(sample)] = (sample, flat, S)  # (the tensor kept: its id stays its own)
    return flat, S


_ONEHOT = 1 << 16  # rows x samples up to which the ranks come from a running count


def record(cap: Capture, module, rule, x: torch.Tensor, y: torch.Tensor, sample: torch.Tensor,
           uses: list, internal, key) -> torch.Tensor:
    """Record the call of ``module`` (``y = module(x)``, a linear map of each row) on rows of
    samples ``sample`` on the padded layout; returns the tapped output (``y`` plus a zero)."""
    N = cap.samples
    flat, S = _slots(cap, sample, N)
    xp = x.new_zeros((N * S, *x.shape[1:]))
    xp.index_copy_(0, flat, x.detach())
    xp = xp.view(N, S, *x.shape[1:])
    zero = torch.zeros((), dtype=y.dtype, device=y.device, requires_grad=True)
    handle = zero.expand(N, S, *y.shape[1:])
    out = y + handle.view(N * S, *y.shape[1:]).index_select(0, flat)
    tkey = (id(module), "routed")
    known = cap.__dict__["routed"]
    tap = RoutedTap(handle, handle.shape, weakref.ref(out), out._version, tkey, False,
                    y.dim(), True, empty=sample.shape[0] == 0,
                    leads=known.setdefault(_LEADS, []))  # (complete when the probe reads it)
    if tkey in cap.hold:
        tap.keep = out
    cap.record(Call(module, rule, [tap], uses, {"x": xp}), internal, key)
    known[(out.grad_fn, 0)] = sample  # the rows of the layers after it
    return out


# rows of dim 0 cut into parts: a split (of rows sorted by expert), a slice
_PARTS = frozenset({"SplitWithSizesBackward0", "SplitBackward0", "SliceBackward0"})
_ROUTES = (frozenset({"IndexBackward0", "IndexSelectBackward0", "CatBackward0"}) | _ELEMENTWISE
           | _PARTS)
