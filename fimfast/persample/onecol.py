"""The fast groups of a one-column step whose layers are all plain ``nn.Linear`` lanes.

EMPIRICAL, and MONTE_CARLO with one draw, back-propagate one score column per sample (docs/math.md
§3-§4). Where every fast group below the closed-form logits layer is a weight or bias of a
``nn.Linear`` (or Hugging Face ``Conv1D``) layer without weight sharing (the case of
:func:`fimfast.persample.squares.linear_lane`), the general chunk loop of
:meth:`fimfast.persample.Engine._fast` decides at every step, per group, what the plan's structure
already told: that the group is a lane, which tap feeds it, whether its bias shares the square
of its weight's output gradient. :func:`layout` decides it once per plan template (the plan
engine reuses templates by :func:`fimfast.persample.plan._structure`, which holds every fact the
layout reads: rules, group kinds and members, tap layouts and batch dims); :func:`run` then forms
the step's squares straight through: one backward of the score column to the taps, per layer
``G^2`` once (kept for the state to fold with its input side, :meth:`fimfast.batch_sums.Sums.defer`)
and the bias's ``sum_n G_n^2`` from it. The operators and their operands are those of the general
path (``linear_lane`` with one column, then :func:`fimfast.persample.squares.finish`), so the
sums are the same bit for bit (tests/test_onecol.py); where a tap gets no gradient, the general
chunk code runs on the same gradients.
"""

from __future__ import annotations

from typing import NamedTuple

from fimfast.hutchinson import vjp
from fimfast.persample import squares
from fimfast.persample.plan import HEAD_KINDS, GroupKind, Plan
from fimfast.rules.linear import LinearRule

__all__ = ["Lane", "layout", "run"]

_LINEAR_TERMS = LinearRule.terms


class Lane(NamedTuple):
    """One layer of a :func:`layout`, by positions in the bound plan.

    Attributes:
        tap: the position of the layer's tap among the taps of ``plan.calls`` in order.
        weight: the position of its weight's group in ``plan.groups`` (``None``: frozen).
        bias: the position of its bias's group (``None``: none or frozen).
    """

    tap: int
    weight: int | None
    bias: int | None


def layout(plan: Plan) -> tuple[Lane, ...] | None:
    """The lanes of ``plan`` when :func:`run` can form its non-head groups, else ``None``: every
    such group has one member, a use of a rule whose terms are ``LinearRule``'s, of kind
    ``OUTER`` (the weight) or ``VEC`` (the bias), through the one tap of its call with one lead
    dim, the batch at dim 0; no call has two groups of a kind; the logits layer's call feeds
    none of them (its squares are in closed form)."""
    taps = [t for c in plan.calls for t in c.taps]
    at = {id(t): k for k, t in enumerate(taps)}
    by_call: dict[int, list] = {}
    for pos, g in enumerate(plan.groups):
        if g.kind in HEAD_KINDS:
            continue
        if len(g.members) != 1 or g.kind not in (GroupKind.OUTER, GroupKind.VEC):
            return None
        c, _ = g.members[0]
        if c is plan.head or type(c.rule).terms is not _LINEAR_TERMS or len(c.taps) != 1:
            return None
        tap = c.taps[0]
        if tap.lead != 1 or tap.bdim != 0 or id(tap) not in at:
            return None
        slot = by_call.setdefault(id(c), [at[id(tap)], None, None])
        k = 1 if g.kind == GroupKind.OUTER else 2
        if slot[k] is not None:
            return None
        slot[k] = pos
    if not by_call:
        return None
    # the weights in plan order first, as the general chunk squares them (Sums.defer's budget
    # is taken in that order)
    lanes = sorted(by_call.values(), key=lambda s: (s[1] is None, s[1] or 0, s[2] or 0))
    return tuple(Lane(*s) for s in lanes)


def run(rows, plan: Plan, cols, acc, retain_graph: bool, backend) -> None:
    """The non-head groups of ``plan`` (:func:`layout` given as ``plan.lanes``) for the one
    score column ``cols.block[0]``: what ``Engine._fast`` forms with one chunk of one column,
    the same operators on the same operands."""
    flat = rows.flat
    u = cols.root  # the score column itself, cols.block[0], as the closed-form head read it
    if u.dtype != flat.dtype:
        u = u.to(flat.dtype)
    calls = plan.calls
    for c in calls:
        c.chunks = 1
    taps = [t for c in calls for t in c.taps]
    grads = vjp(flat, [t.handle for t in taps], u, retain_graph, False)
    groups = plan.groups
    if not _complete(grads):  # the general chunk on the same gradients
        _general(plan, taps, grads, acc, backend)
        return
    dtypes = acc.dtypes
    for lane in plan.lanes:
        G = grads[lane.tap]
        G2 = dt2 = None
        if lane.weight is not None:
            g = groups[lane.weight]
            dt2 = dtypes[g.index]
            x = g.members[0][0].data["x"]
            if acc.fold:
                G2 = G.to(dt2).square()
                if acc.defer(g.index, G2, x, g.block, g.transposed, squared=True):
                    x = None
            # else not kept: sq_matmul squares both sides (squares.finish of a root)
            if x is not None and not acc.defer(g.index, G, x, g.block, g.transposed):
                acc.add(g.index, squares._weight_sq(g, G, x, backend), g.block)
        if lane.bias is not None:
            b = groups[lane.bias]
            dt = dtypes[b.index]
            if G2 is None or dt != dt2:
                G2 = G.to(dt).square()
            acc.add(b.index, G2.sum(0), b.block)


def _complete(grads: list) -> bool:
    """Whether every tap got a gradient (the tap checks make it so: its output reaches the
    logits)."""
    return all(g is not None for g in grads)


def _general(plan: Plan, taps, grads, acc, backend) -> None:
    """The general chunk of one column (``Engine._fast``'s ``_chunk`` and ``finish``) on the
    gradients ``grads`` of ``taps``."""
    from fimfast.persample.engine import _chunk

    groups = [g for g in plan.groups if g.kind not in HEAD_KINDS]
    for g in groups:
        g.state.single = True
    gmap = {id(t.handle): None if g is None else g.unsqueeze(0) for t, g in zip(taps, grads)}
    _chunk(groups, gmap, acc, backend)
    squares.finish(groups, acc, backend)
