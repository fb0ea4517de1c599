"""The walk of a per-sample step's autograd graph, in one call of the extension where it loads.

:func:`fimfast.hooks.walk` walks the whole graph of the logits in Python at every step, one Python
object per node: the parameters' edges, every node reached (for the tap checks of
:func:`fimfast.persample.plan.check_taps`) and whether a reentrant checkpoint is on the way.
:func:`walk` asks the extension (csrc/tap_walk.cpp) the same in one call: the edges, whether each
tap handle of the capture is reached and the reentrant flag, with no Python object made for the
nodes. Without the extension, :func:`fimfast.hooks.walk` runs.

Either way the walk tells the graph's shape (:func:`shape`, a hash of the types of its nodes
and of the constants each keeps for its backward, but for the taps'), which the key of a step's
structure holds: an operation added between two steps without a module call of its own (a mean
over the batch that couples the samples, a scaling), or an operation's argument changed (a
cumulative sum's or a softmax's dimension turned to the batch), makes the step another
structure, whose samples are probed again (:mod:`fimfast.persample.probe`). The constants are
the dimensions, scalar types and Python scalars a node keeps, not the sizes (a batch or a
sequence of another length is the same structure) nor the saved tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from fimfast import _ext, hooks

__all__ = ["TapGraph", "shape", "walk"]


@dataclass
class TapGraph(hooks.Graph):
    """A :class:`fimfast.hooks.Graph` whose nodes were not made Python objects (``nodes`` is
    empty): ``reached`` holds the ids of the tap handles that the gradient of the logits
    reaches, all that :func:`fimfast.persample.plan.check_taps` asks of the nodes."""

    reached: set = field(default_factory=set)
    shape: int = 0

    def reaches(self, t: torch.Tensor) -> bool:
        """Whether the gradient of the logits flows back to ``t``, a tap handle of the walk."""
        return id(t) in self.reached


def walk(flat: torch.Tensor, params: list[torch.Tensor], cap: hooks.Capture | None) -> hooks.Graph:
    """:func:`fimfast.hooks.walk` of ``flat`` with ``params``, the tap handles of ``cap`` asked
    whether they are reached (a :class:`TapGraph`), by the extension where it loads."""
    fn = _HOST[0] if _HOST else _host()
    if fn is None:
        return hooks.walk(flat, params)
    handles = [] if cap is None else [t.handle for c in cap.calls for t in c.taps]
    out = fn(flat, params, handles)
    if len(out) != 4:  # an extension built before the walk told the shape
        return hooks.walk(flat, params)
    counts, reached, reentrant, fp = out
    edges: Counter = Counter()
    for p, k in zip(params, counts):
        if k:
            edges[id(p)] = k
    return TapGraph(edges, set(), reentrant, {id(h) for h, r in zip(handles, reached) if r}, fp)


def shape(graph: hooks.Graph) -> int:
    """The shape of the walked graph: a hash of the types of its nodes and of the constants each
    keeps for its backward, but for the leaves' and the adds and expands (which the capture's taps
    put in or leave out from one step to the next), the same for the same operations: the
    extension's (csrc/tap_walk.cpp: what each node's ``compiled_args`` collects), else the hash
    of the nodes' types and their ``_saved_`` attributes that are neither tensors nor sizes
    (whose names hold ``sym_``), in any order."""
    if type(graph) is TapGraph:
        return graph.shape
    parts = [_part(node) for node in graph.nodes if type(node).__name__ not in _NOT_SHAPE]
    return hash((len(parts), sum(parts) & 0xFFFFFFFFFFFFFFFF))


_NOT_SHAPE = frozenset(("AccumulateGrad", "AddBackward0", "ExpandBackward0"))


def _part(node) -> int:
    """A node's part in :func:`shape`: its type and its constants."""
    t = type(node)
    names = _CONSTANTS.get(t)
    if names is None:
        names = _CONSTANTS[t] = _constant_names(t)
    if not names:
        return id(t)
    values = []
    for a in names:
        try:
            values.append(_constant(getattr(node, a)))
        except Exception:  # released after a backward, or unreadable: no constant
            values.append(None)
    return hash((id(t), tuple(values)))


def _constant_names(t: type) -> tuple:
    """The ``_saved_`` attributes of a node type that hold no tensor (those have a ``_raw_saved_``
    twin) nor a size."""
    names = set(dir(t))
    return tuple(a for a in sorted(names) if a.startswith("_saved_") and "sym_" not in a
                 and "_raw" + a not in names)


def _constant(v):
    """``v`` with the tensors in it left out (a hashable value)."""
    if isinstance(v, torch.Tensor):
        return None
    if isinstance(v, (tuple, list)):
        return tuple(map(_constant, v))
    try:
        hash(v)
    except TypeError:
        return type(v).__name__
    return v


_CONSTANTS: dict = {}


def _host():
    """The extension's ``tap_walk`` (``None`` without it), looked up once."""
    _HOST[:] = [_ext.host_function("tap_walk")]
    return _HOST[0]


_HOST: list = []
