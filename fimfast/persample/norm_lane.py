"""The squares of a channel norm's affine parameters for one column, without the rule's terms.

A channel norm (``BatchNorm``, ``GroupNorm``, ``InstanceNorm``: :class:`fimfast.rules.norm.
_ChannelNormRule`) gives its weight ``sum_t G * xhat`` and its bias ``sum_t G`` per sample
(docs/math.md). With one column in one chunk (EMPIRICAL, one draw of MONTE_CARLO) the rule's
:meth:`~fimfast.rules.norm._NormRule.terms` forms both in ``xhat``'s place and
:func:`fimfast.persample.squares.accumulate` squares each :class:`~fimfast.rules.Vec`: here the
same operators on the same operands run straight from the output gradient, once per call for
both groups, without the terms' objects, their checks and the squares' cache look-ups (about
60 us of Python per layer and step, benchmarks/results/small_nets_cpu_2026-12-07.md). The sums
are the rule's bit for bit (tests/test_norm_lane.py); any other case (several columns, a rule
that changes the terms, its layout or ``xhat``'s use) takes the general code.
"""

from __future__ import annotations

import torch

from fimfast.batch_sums import Sums
from fimfast.dtypes import compute_dtype
from fimfast.persample.plan import Group, GroupKind
from fimfast.rules.norm import _ChannelNormRule, _NormRule

__all__ = ["take"]

_TERMS = _NormRule.terms  # the rule's own terms (checked): a subclass that overrides them is out
_FRONT = _ChannelNormRule.front


def _plain(rule) -> bool:
    """Whether ``rule`` forms its terms as :class:`_ChannelNormRule` does with one column."""
    ty = type(rule)
    return (isinstance(rule, _ChannelNormRule) and ty.terms is _TERMS and ty.front is _FRONT
            and rule.single_in_place)


def take(g: Group, gmap: dict, acc: Sums, done: dict) -> bool:
    """Add the square of group ``g`` (a weight or bias of a channel norm, one member, one
    column in one chunk) into ``acc``; ``done`` holds the chunk's pairs of per-sample sums by
    call (the weight and the bias of a call read one). ``False``, with nothing done, for any
    other group."""
    if g.kind != GroupKind.VEC or len(g.members) != 1:
        return False
    c, ui = g.members[0]
    pair = done.get(id(c))
    if pair is None:
        if c.chunks != 1 or len(c.taps) != 1 or not _plain(c.rule):
            return False
        G = gmap.get(id(c.taps[0].handle))
        if G is None or G.shape[0] != 1 or "memo" not in c.data:
            return False
        pair = done[id(c)] = _pair(c, G)
    V = pair[0] if c.data["weights"][ui] else pair[1]
    acc.add(g.index, V.to(acc.dtypes[g.index]).square().sum(0), g.block)
    return True


def _pair(c, G: torch.Tensor) -> tuple:
    """``(weight's, bias's)`` per-sample sums of call ``c``, ``(N, C)`` each, as the rule's
    terms form them with one column (``xhat`` taken from the call's data and multiplied in
    place); the bias's may be a view of ``G``. Without positions (``(N, C)`` outputs:
    ``BatchNorm1d`` after a linear layer) the sums over the one position are left out (a sum
    of one term is the term)."""
    rule, tap, data = c.rule, c.taps[0], c.data
    memo, seen = data["memo"]  # the columns of this step, for the next forward (as terms)
    memo[seen] = data["M"] = max(1, data.get("M", 0))
    dt = compute_dtype(G.dtype)
    xh = data.pop("xhat", None)
    if G.dim() == 3 and xh is None:  # (1, N, C)
        G0 = G[0] if G.dtype == dt else G[0].to(dt)
        x = data["x"]
        return rule.xhat(c.module, x if x.dtype == dt else x.to(dt), data).mul_(G0), G0
    Gf = rule.front(tap, G.to(dt), extra=1)[0]
    if xh is None:
        xh = rule.front(tap, rule.xhat(c.module, data["x"].to(dt), data))
    return xh.mul_(Gf).sum(1), Gf.sum(1)
