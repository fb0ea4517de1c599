"""The squares of a recurrent layer's weights (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) by pairs of
time steps.

The layer's rule (:class:`fimfast.rules.recurrent.RecurrentRule`) taps the gate
pre-activations of every step of a layer and direction: one tap, whose gradient ``P``
``(M, N, T, gates * H)`` its four parameters read (``W_ih``: ``sum_t P_t (x) x_t``, ``W_hh``:
``sum_t P_h,t (x) h_{t-1}``, the biases the sums over the steps; docs/math.md §4, "Recurrent
layers"). These are the terms of a looped cell's calls (:mod:`.cell_lane`) with the steps in
place of the calls, and are squared the same way where the cost model :func:`_by_pairs` finds
it cheaper: ``A`` ``(N, T (T + 1) / 2, gates * H)``, the
pairs' products of ``P`` (:func:`fimfast.ops.pair_gram`), added up over the chunks of columns,
and at the end of the step (:func:`.cell_lane.finish`) one product ``A^T Z`` per input side
(``Z`` the pairs of ``x_t`` or ``h_{t-1}``, a bias as one more column of ones), the GRU's
hidden side with the candidate rows of ``A`` scaled by ``r_t r_s``. A group is taken here when
it is the only use of its parameter, a weight or bias of the gates (not an LSTM's projection
``W_hr``, whose tap is another), and its layer's tap has a gradient; the other groups, and all
of them where the pairs cost more, take the general chunk (the rule's terms). The sums are
those of the general path to rounding.
"""

from __future__ import annotations

import torch

from fimfast import _env, ops
from fimfast.persample import cell_lane
from fimfast.persample.plan import Group, GroupKind
from fimfast.rules.recurrent import RecurrentRule, _side

_KINDS = (GroupKind.OUTER, GroupKind.VEC)
_GATES = ("weight_ih", "bias_ih", "weight_hh", "bias_hh")
_HIDDEN = ("weight_hh", "bias_hh")


def run(groups: list[Group], gmap: dict, acc, backend) -> list[Group]:
    """Add the pairs' products of the groups this module takes (module docstring) for one
    chunk's tap gradients ``gmap``; returns the others, for the general chunk."""
    rest: list[Group] = []
    dirs: dict = {}  # the groups taken, by their layer and direction
    for g in groups:
        key = _direction(g, gmap)
        if key is None:
            rest.append(g)
        else:
            dirs.setdefault(key, []).append(g)
    for (_, k), gs in dirs.items():
        c = gs[0].members[0][0]
        d = c.data["dirs"][k]
        G = gmap[id(c.taps[d["gate"]].handle)]
        members = [(g, c.data["src"][g.members[0][1]][1] in _HIDDEN) for g in gs]
        Ps = list(G.unbind(2))
        state = _state(c, d, members, Ps, backend)
        if state is None:
            rest.extend(gs)
            continue
        state["A"] = ops.pair_gram(Ps, out=state["A"], backend=backend)
    return rest


def _state(c, d: dict, members: list, Ps: list, backend) -> dict | None:
    """The pairs' state of one layer and direction (:func:`.cell_lane._pairs`), ``None``: the
    general chunk (the pairs cost more)."""
    seq = d.get("pairs")
    if seq is None:
        gru = c.module.mode == "GRU"
        seq = d["pairs"] = {"X": _side(d, "x"), "H": _side(d, "hp"),
                            "r": _side(d, "r") if gru else None}
    return cell_lane._pairs([c], seq, members, Ps, backend, _by_pairs)


def _by_pairs(M: int, N: int, T: int, O: int, I: int, device: torch.device) -> bool:
    """Whether the pairs' products of ``M`` columns in all cost less than the rule's terms
    squared per column and sample (:func:`fimfast.persample.squares._outer_sq`), for ``T``
    steps of ``N`` samples, gates ``O`` and input sides of ``I`` features in all, by a cost
    model of the CPU (1 thread) measured on these layers' shapes
    (benchmarks/results/recurrent_pairs_cpu_2026-12-07.md): the per-sample products at about
    30 multiply-adds per ns, the pairs' Gram pass (:func:`fimfast.ops.pair_gram`) at about 10,
    the products ``A^T Z`` at about 33 (inner dimension ``N T (T + 1) / 2`` against outputs of
    ``O I``: slower than the looped cells' larger ones, whose general path also pays a
    concatenation of the calls that the layer's stacked terms do not); ``A`` must fit the
    memory budget."""
    NP = T * (T + 1) // 2
    if device.type != "cpu" or N * NP * O * 8 > _env.memory_budget_bytes():
        return False
    return NP * (I / 33 + M / 10) < M * T * I / 30


def _direction(g: Group, gmap: dict) -> tuple | None:
    """``(call id, layer and direction)`` of a group this module takes, else ``None``."""
    if g.kind not in _KINDS or g.block is not None or len(g.members) != 1:
        return None
    c, ui = g.members[0]
    if not isinstance(c.rule, RecurrentRule) or c.uses[ui].transposed:
        return None
    k, role = c.data["src"][ui]
    if role not in _GATES:
        return None
    d = c.data["dirs"][k]
    if gmap.get(id(c.taps[d["gate"]].handle)) is None:
        return None
    return id(c), k
