"""Rows folded by size: whether the ``N * k`` rows of a layer's input are the samples' rows by
construction.

A layer output of ``N * k`` rows is recorded as ``(N, k, ...)``
(:func:`fimfast.rules.linear.folded`) and the probe checks, once per structure, that sample
``n``'s gradient stays in rows ``n k`` to ``n k + k - 1`` (:mod:`fimfast.persample.probe`). The
verdict is kept for later steps of the same structure, which is right where the rows' samples
follow from the shapes alone:

* the input is a view of a tensor whose dim 0 is the batch (``x.reshape(-1, d)`` of an
  ``(N, T, d)`` tensor: a view merging dim 0 with the next ones is sample-major), read from the
  tensor's ``_base`` (no gradient) or from the autograd graph (``ViewBackward0`` and the other
  views keep the input's sizes);
* or a function, row by row, of such rows and of the outputs of layers recorded on proven folded
  rows (an activation, dropout, a residual sum, a scale by a parameter or a constant): walked
  back through the autograd graph (:func:`proven`). Rows reached only from parameters and
  tensors without gradient (``(1 + eps) * x`` of a node list ``x``) are not proven.

Rows made otherwise (graphs of several sizes batched as one node list, ``torch.cat`` of the
samples' rows, a reshape that copies) may hold other samples in a batch of the same shapes: three
graphs of 3 nodes fold as ``(3 * 3)`` node rows sample by sample, and graphs of 2, 4 and 3 nodes
give the same shapes with node 2 in the second graph. Such calls are marked (``tap.refold``) and
their steps probed and planned afresh (:func:`fimfast.persample.probe.refolds`).
"""

from __future__ import annotations

import torch

# autograd nodes of functions computed row by row (the output's row r from the inputs' row r,
# broadcast operands aside)
_ROWWISE = frozenset(f"{n}Backward0" for n in (
    "Relu", "Gelu", "Tanh", "Sigmoid", "Silu", "Elu", "LeakyRelu", "Hardtanh", "Hardswish",
    "Hardsigmoid", "Softplus", "Mish", "LogSigmoid", "Exp", "Neg", "Abs", "Sqrt", "Rsqrt",
    "ClampMin", "Threshold", "NativeDropout", "Mul", "Add", "Sub", "Div", "Clone", "ToCopy",
    "Pow", "Expand")) | {"ClampBackward1", "PowBackward1", "PowBackward2"}
_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_LIMIT = 256  # nodes walked before giving up (the step is then probed afresh: exact)


def proven(cap, x: torch.Tensor, N: int) -> bool:
    """Whether the rows of ``x`` (``N * k`` of them) are its samples' rows by construction
    (module docstring); ``cap`` holds the outputs of layers on proven folded rows."""
    b = x._base
    if (b is not None and b.dim() >= 1 and b.shape[0] == N and b.is_contiguous()
            and x.is_contiguous() and x.numel() == b.numel()
            and x.storage_offset() == b.storage_offset()):
        return True
    if x.grad_fn is None:
        return False
    memo: dict[int, str] = {}
    return _rows(x.grad_fn, getattr(cap, "fold_rows", {}), N, x.shape[0], memo) == _ROWS


_ROWS, _NONE, _BAD = "rows", "none", "bad"


def _rows(f, known: dict, N: int, M: int, memo: dict) -> str:
    """Where the rows of node ``f``'s output come from: ``_ROWS`` (proven rows, through
    functions computed row by row), ``_NONE`` (parameters and constants only: rows of a tensor
    without gradient, unknown) or ``_BAD`` (anything else, or too large a graph)."""
    if f is None or type(f).__name__ == "AccumulateGrad":
        return _NONE
    if id(f) in known:
        return _ROWS
    if id(f) in memo:
        return memo[id(f)]
    if len(memo) > _LIMIT:
        return _BAD
    memo[id(f)] = _BAD  # (while walking: a cycle cannot occur in autograd graphs)
    name = type(f).__name__
    if name in _VIEWS:
        sizes = getattr(f, "_saved_self_sym_sizes", None)
        if sizes and sizes[0] == N:  # a view merging the batch dim with the next: sample-major
            memo[id(f)] = _ROWS
            return _ROWS
        if not sizes or sizes[0] != M:
            return _BAD
    elif name not in _ROWWISE:
        return _BAD
    got = {_rows(g, known, N, M, memo) for g, _ in f.next_functions}
    memo[id(f)] = _BAD if _BAD in got else (_ROWS if _ROWS in got else _NONE)
    return memo[id(f)]


def mark(cap, tap, x: torch.Tensor, out: torch.Tensor, N: int) -> None:
    """After a call recorded folded: mark ``tap`` to be probed at every step unless the rows of
    its input ``x`` are proven (:func:`proven`); remember the call's (flattened) output ``out``
    as proven rows when they are."""
    if not proven(cap, x, N):
        tap.refold = True
    elif out.grad_fn is not None:
        if not hasattr(cap, "fold_rows"):
            cap.fold_rows = {}
        cap.fold_rows[id(out.grad_fn)] = out.grad_fn  # (kept alive with the capture)
