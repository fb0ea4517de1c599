"""Row-sparse gradients of embedding tables in the HUTCHINSON family's backward.

A lookup table (``nn.Embedding``, ``nn.EmbeddingBag``) gets a gradient only at the rows a batch
looks up: a few hundred of a 20k or 50k-row table. Autograd's dense backward still writes the whole
table (zeros, then an index-add), and squaring it into the state reads and writes the whole table
again: on a bag-of-words classifier with a 20000 x 64 table that pass alone cost most of a training
step. During a HUTCHINSON step (never a training step, whose ``.grad`` must keep the user's layout)
the tables of :func:`candidates` run with ``sparse=True``, so their gradient comes back as a sparse
COO tensor of the looked-up rows, and its squares are added at those rows only
(:func:`row_squares`). Exact: a row the batch does not look up has a zero gradient through the
lookup, and any other use of the table (a tied output layer) adds its dense gradient to the sparse
one in autograd as before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["MIN_ROWS", "candidates", "live", "row_squares", "sparse_lookups"]

# tables with fewer rows keep the dense backward (its full pass is cheap there)
MIN_ROWS = 1024


def candidates(model: nn.Module, params: list[torch.Tensor]) -> list[nn.Module]:
    """The lookup modules of ``model`` whose table is one of ``params`` and may run sparse: a
    plain dense ``nn.Parameter`` (no tensor subclass such as a sharded ``DTensor``) of at least
    :data:`MIN_ROWS` rows on the CPU or a CUDA device, not sparse already, not
    ``scale_grad_by_freq`` and for ``nn.EmbeddingBag`` not ``mode="max"`` (torch has no sparse
    backward for either; a parametrized table is no parameter, and is not read). None in a model
    holding a ``torch.compile`` wrapper (the flag would be a guard of the compiled code)."""
    ids = {id(p) for p in params}
    out = []
    # torch.compile's wrapper class; none exists before its module is loaded (which would import
    # torch._dynamo: seconds, and torch.distributed.tensor with it)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    for m in model.modules():
        if isinstance(m, compiled):
            return []
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or m.sparse:
            continue
        # the table as registered: a parametrized one is computed at each read (spectral_norm's
        # power iteration in training mode runs once more), and is no parameter
        w = m._parameters.get("weight")
        if (
            id(w) in ids
            and type(w) is nn.Parameter
            and type(w.data) is torch.Tensor
            and w.layout == torch.strided
            and w.device.type in ("cpu", "cuda")
            and w.dim() == 2
            and w.shape[0] >= MIN_ROWS
            and getattr(m, "mode", "sum") != "max"
            and not m.scale_grad_by_freq
        ):
            out.append(m)
    return out


def live(tables: list[nn.Module]) -> list[nn.Module]:
    """``tables`` (:func:`candidates`, found once per parameter set) less those whose settings
    no longer allow a sparse backward: an ``nn.EmbeddingBag`` set to ``mode="max"`` after a step
    (torch then refused the step's backward, which read as a failed forward)."""
    for m in tables:
        if getattr(m, "mode", "sum") == "max":
            return [t for t in tables if getattr(t, "mode", "sum") != "max"]
    return tables


@contextmanager
def sparse_lookups(modules: list[nn.Module]) -> Iterator[None]:
    """Run the body with ``sparse=True`` on ``modules``; each is put back on exit, also when the
    body raises."""
    flipped = []
    try:
        for m in modules:
            if not m.sparse:
                m.sparse = True
                flipped.append(m)
        yield
    finally:
        for m in flipped:
            m.sparse = False


def row_squares(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, squares)`` of a row-sparse gradient ``g`` (COO, sparse in its first dimension):
    the distinct rows and the squares, in ``dtype``, of their summed gradients (a row looked up
    several times gets one entry, the square of its total)."""
    g = g.coalesce()
    rows = g.indices()[0]
    v = g.values().to(dtype)
    return rows, v * v
