"""Which forwards the check of the lookups of ids ``(T,)`` expanded to the batch has seen.

A lookup without a batch dimension (a position table read with ``arange(T)``) gains one when the
capture expands it (:meth:`fimfast.persample.replay.Replay.forward`); what the forward does with
its output afterwards decides whether the expanded forward computes the model's logits
(``p + x`` does; ``p.mean(0)``, ``p[0]`` or ``p.cumsum(0)`` over the positions do not: over the
batch once expanded). The expanded forward is checked against the model's own once per kind of
forward: the operations of its autograd graph (:func:`ops_key`). A forward that starts using the
output otherwise after a step (a flag, a branch, a forward replaced) adds or changes operations,
and is checked again (a check made once per engine had those steps 30-92% off).
"""

from __future__ import annotations

import torch

__all__ = ["ops_key"]

_SKIP = frozenset(("AccumulateGrad", "AddBackward0", "ExpandBackward0"))


def ops_key(t: torch.Tensor) -> int:
    """A hash of the types of the autograd nodes behind ``t`` (the leaves', the adds' and the
    expands' left out: the capture's taps put them in or leave them out), as
    :func:`fimfast.persample.walk.shape` hashes a step's graph."""
    fn = t.grad_fn
    if fn is None:
        return 0
    seen, stack, types = {fn}, [fn], []
    while stack:
        node = stack.pop()
        ty = type(node)
        if ty.__name__ not in _SKIP:
            types.append(id(ty))
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    types.sort()
    return hash(tuple(types))
