"""The squares of a recurrent cell called several times in one forward, for all its calls at once.

A cell looped over ``T`` steps (:class:`fimfast.rules.cells.CellRule`, and the functional cells
of :mod:`fimfast.functional_cells`) records ``T`` calls; each of its parameters is one group of
``T`` members, whose terms add up over the calls before the square (docs/math.md §4, "Recurrent
layers"). The general chunk (:func:`fimfast.persample.engine._chunk`) forms each call's terms and
concatenates them per group; here the calls' gate gradients are stacked once per chunk,
``P`` ``(M, N, T, gates * H)``, and the four parameters read it:

* ``W_ih``: ``sum_{m,n} (P[m, n]^T X[n])^2`` with ``X`` ``(N, T, I)`` the calls' inputs;
* ``W_hh``: the same with ``P_h`` against the calls' states ``H`` ``(N, T, H)``, where ``P_h = P``
  but for the GRU's candidate gate, ``P`` times the reset gate ``r`` of each call, formed for
  all the calls by one product ``H W_hr^T`` (the general path forms it call by call);
* ``b_ih``, ``b_hh``: ``sum_{m,n} (sum_t P[m, n, t])^2`` and the same of ``P_h``.

The inputs, states and reset gates are formed once per step (the calls' data), the stacked
gradients once per chunk for the four groups. A group is taken here when every member is a
call of a cell rule whose tap has a gradient, the calls are at least two and distinct, and the
group covers its whole parameter; any other group takes the general chunk. The sums are those
of the general path to rounding (the same products, added in another order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fimfast import _env, chunks, ops
from fimfast.ops.pairs import pair_inputs
from fimfast.persample import squares
from fimfast.persample.plan import Group, GroupKind
from fimfast.rules.base import front
from fimfast.rules.cells import CellRule

_KINDS = (GroupKind.OUTER, GroupKind.VEC)


_HIDDEN = ("weight_hh", "bias_hh")


def run(groups: list[Group], gmap: dict, acc, backend) -> list[Group]:
    """Square the groups of ``groups`` this module takes (see the module docstring) for one
    chunk's tap gradients ``gmap``; returns the others, for the general chunk."""
    rest: list[Group] = []
    cells: dict = {}  # the groups taken, by their calls
    for g in groups:
        calls = _calls(g, gmap)
        if calls is None:
            rest.append(g)
            continue
        cells.setdefault(tuple(map(id, calls)), (calls, []))[1].append(g)
    chunk: dict = {}  # this chunk's stacked gradients and their sums over the calls
    for calls, gs in cells.values():
        seq = _sequence(calls)
        members = [(g, calls[0].data["roles"][g.members[0][1]] in _HIDDEN) for g in gs]
        Ps = [_position(c, gmap) for c in calls]
        state = _pairs(calls, seq, members, Ps, backend)
        if state is not None:  # every member from the step's A, at its end (finish)
            state["A"] = ops.pair_gram(Ps, out=state["A"], backend=backend)
            continue
        for g, hidden in members:
            if g.kind == GroupKind.VEC:
                V = _summed(calls, gmap, seq, hidden, chunk)
                acc.add(g.index, V.to(acc.dtypes[g.index]).square().sum((0, 1)))
            elif hidden and seq["r"] is not None:  # the GRU's: P_h by its rows (no P_h formed)
                Hd = seq["r"].shape[-1]
                P = _stacked(calls, gmap, seq, False, chunk)
                Pr = _stacked(calls, gmap, seq, True, chunk)
                parts = [squares._outer_sq(Q, seq["H"], backend) for Q in (P[..., : 2 * Hd], Pr)]
                acc.add(g.index, torch.cat(parts, 0))
            else:
                P = _stacked(calls, gmap, seq, False, chunk)
                acc.add(g.index, squares._outer_sq(P, seq["H" if hidden else "X"], backend))
    return rest


def _position(c, gmap: dict) -> torch.Tensor:
    """A call's gate gradients ``(M, N, gates * H)``."""
    tap = c.taps[0]
    return front(gmap[id(tap.handle)], tap.bdim, tap.lead, extra=1)[:, :, 0]


def _pairs(calls, seq: dict, members: list, Ps: list, backend, decide=None) -> dict | None:
    """The state of the pairs' products of a cell's groups ``[(group, hidden side)]`` (kept in
    their groups' states, shared), made at the first chunk whose weights find them cheaper
    (``decide``, by default :func:`_by_pairs`); ``None``: not by pairs (the groups then take
    one product per column and sample, :func:`fimfast.persample.squares._outer_sq`, and the
    stacked sums)."""
    states = {id(g.state.cell) for g, _ in members}
    state = members[0][0].state.cell
    ids = tuple(id(g) for g, _ in members)
    if len(states) != 1 or (state is not None and state["groups"] != ids):
        raise RuntimeError(f"the parameters of {calls[0].module} lost their pairs' products")
    if state is not None:
        return state
    sides = [seq["H" if h else "X"] for g, h in members if g.kind == GroupKind.OUTER]
    (M, N, O), dev = Ps[0].shape, Ps[0].device
    M *= max(1, getattr(calls[0], "chunks", 1) or 1)
    decide = decide or _by_pairs
    if not sides or not decide(M, N, len(Ps), O, sum(Q.shape[-1] for Q in sides), dev):
        return None
    try:
        ops.registry.resolve("pair_gram_", backend, dev)
    except ops.BackendUnavailableError:
        return None  # that backend's per-sample products run
    state = {"A": None, "groups": ids, "seq": seq,
             "kinds": {id(g): (g.kind == GroupKind.OUTER, h) for g, h in members}}
    for g, _ in members:
        g.state.cell = state
    return state


def _by_pairs(M: int, N: int, T: int, O: int, I: int, device: torch.device) -> bool:
    """Whether the pairs' products (:mod:`fimfast.ops.pairs`) of ``M`` columns in all cost less
    than one product per column and sample for ``T`` calls of ``N`` samples, gates ``O`` and
    input sides of ``I`` features in all, by a cost model of the CPU (1 thread): the product of
    the pairs runs at about 85 multiply-adds per ns, the per-sample products at about 30, the
    pairs' Gram pass at about 10; ``A`` must fit the memory budget."""
    NP = T * (T + 1) // 2
    if device.type != "cpu" or N * NP * O * 8 > _env.memory_budget_bytes():
        return False
    return NP * (I / 85 + M / 10) < M * T * I / 30


def columns(groups: list[Group], taps: list, most: int, total: int) -> int:
    """Columns per backward chunk (``most`` as the memory budget allows, of ``total``), more
    where a cell's weights take the pairs' products: those hold ``A`` ``(N, T (T + 1) / 2,
    gates * H)`` for the whole step, whose memory the chunk's tap gradients may use as well (one
    backward of all the columns, not several: the recurrence is walked once, and ``A`` written
    once; nor streamed: its hooks need every tap by an add, whose backward sums each gradient)."""
    if most >= total or not taps:
        return most
    buckets: dict = {}
    for g in groups:
        calls = _calls(g, None)
        if calls is not None and g.kind == GroupKind.OUTER:
            buckets.setdefault(tuple(map(id, calls)), (calls, []))[1].append(g)
    extra = 0
    for calls, gs in buckets.values():
        d = calls[0].data
        N, O = d["gi"].shape
        I = sum(d["h" if d["roles"][g.members[0][1]] == "weight_hh" else "x"].shape[-1]
                for g in gs)
        if _by_pairs(total, N, len(calls), O, I, d["gi"].device):
            extra += 4 * N * (len(calls) * (len(calls) + 1) // 2) * O
    if not extra:
        return most
    sizes = [math.prod(t.shape) for t in taps]
    per_col = 4 * (sum(sizes) + max(sizes))  # as chunks.fast_columns counts a column
    return chunks.balanced(total, most + extra // max(1, per_col))


def finish(groups: list[Group], acc) -> None:
    """The squares of the groups whose pairs' products the chunks added up (:func:`_pairs`)."""
    for g in groups:
        state = g.state.cell
        if state is None:
            continue
        g.state.cell = None
        if "out" not in state:
            state["out"] = _products(state)
        acc.add(g.index, state["out"].pop(id(g)))


def _products(state: dict) -> dict:
    """The squares of every group of a state, by group id, from one pair side ``Z`` of the
    inputs, a column of ones and the states side by side (:func:`_pair_side`): the weights'
    ``A^T Z`` and the biases' ``A^T w`` (the column of ones: the pairs' weights ``w``) as the
    columns of one product, formed transposed, ``Z^T A`` (``A`` read by rows: 1.3-1.7x faster
    than ``A^T Z`` for these shapes, 1 thread); the GRU's hidden side takes ``A r_t r_s`` in
    the rows of its candidate gate (``P_h = P r`` there), its other rows those of ``A``."""
    seq = state["seq"]
    N, NP, O = state["A"].shape
    kinds = state["kinds"].items()
    want = {"X": any(o and not h for _, (o, h) in kinds),
            "1": any(not o for _, (o, _h) in kinds), "H": any(o and h for _, (o, h) in kinds)}
    Z, cols = _pair_side(seq, want)
    A2 = state["A"].view(N * NP, O)
    Z = Z.view(N * NP, -1).to(A2.dtype)
    Hd = 0 if seq["r"] is None else seq["r"].shape[-1]
    H2 = 2 * Hd
    blocks: dict = {False: [], True: []}  # per side: the products ((K, rows), first row)
    if not Hd:
        blocks[False].append((Z.t() @ A2, 0))
        blocks[True] = blocks[False]
    else:
        first = Z.t() @ A2[:, :H2]
        for hidden in (False, True):  # the candidate rows of A, then A r_t r_s in place
            lo, hi = _span(cols, hidden)
            if hi > lo:
                F = Z[:, lo:hi].t() @ (_scaled_a(state) if hidden else A2[:, H2:])
                blocks[hidden] = [(first, 0), (F, lo)]
    out: dict = {}
    for gid, (outer, hidden) in kinds:
        c0, c1 = cols["H" if hidden else "X"] if outer else cols["1"]
        parts = [F[c0 - lo : c1 - lo] for F, lo in blocks[hidden]]
        W = parts[0].t() if len(parts) == 1 else torch.cat(parts, 1).t()
        out[gid] = W.contiguous() if outer else W[:, 0].contiguous()
    return out


def _span(cols: dict, hidden: bool) -> tuple[int, int]:
    """The columns of ``Z`` the candidate rows of one side of the GRU read: ``X`` (``hidden``:
    ``H``) and the column of ones (both where present, adjacent in ``Z``)."""
    spans = [cols[k] for k in (("1", "H") if hidden else ("X", "1")) if k in cols]
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0, 0)


def _scaled_a(state: dict) -> torch.Tensor:
    """The candidate rows of ``A`` times ``r_t r_s`` ``(N NP, H)``, in place in ``A`` (its last
    use: read unscaled before, :func:`_products`)."""
    A, seq = state["A"], state["seq"]
    N, NP, O = A.shape
    H2 = 2 * seq["r"].shape[-1]
    Ar = A[..., H2:]
    Ar.mul_(pair_inputs(seq["r"], 1.0).to(A.dtype))
    return Ar.view(N * NP, O - H2)


def _pair_side(seq: dict, want: dict) -> tuple[torch.Tensor, dict]:
    """The pairs (:func:`fimfast.ops.pairs.pair_inputs`) of the inputs ``X``, a column of ones
    and the states ``H`` side by side, those of ``want`` (by name: ``"X"``, ``"1"``, ``"H"``);
    one pass, once per step. Returns ``Z`` and each part's columns ``(first, end)``."""
    key = ("Z", tuple(k for k in ("X", "1", "H") if want[k]))
    hit = seq.get(key)
    if hit is not None:
        return hit
    parts, cols, k = [], {}, 0
    for name in key[1]:
        if name == "1":
            Q = seq["X"]
            part = Q.new_ones(*Q.shape[:-1], 1)
        else:
            part = seq[name]
        parts.append(part)
        cols[name] = (k, k + part.shape[-1])
        k += part.shape[-1]
    Q = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    seq[key] = (pair_inputs(Q), cols)
    return seq[key]


def _summed(calls, gmap, seq, hidden: bool, chunk: dict) -> torch.Tensor:
    """``sum_t P`` (``hidden``: of ``P_h``) ``(M, N, gates * H)``, once per chunk; the GRU's
    hidden side scales only its candidate gate (no ``P_h`` formed)."""
    gru = hidden and seq["r"] is not None
    key = ("sum", tuple(map(id, calls)), gru)
    if key not in chunk:
        if gru:
            V, Hd = _summed(calls, gmap, seq, False, chunk), seq["r"].shape[-1]
            Pr = _stacked(calls, gmap, seq, True, chunk)
            chunk[key] = torch.cat([V[..., : 2 * Hd], Pr.sum(2)], -1)
        else:
            chunk[key] = _stacked(calls, gmap, seq, False, chunk).sum(2)
    return chunk[key]


def _calls(g: Group, gmap: dict | None) -> list | None:
    """The calls of a group this module squares, in order, else ``None`` (``gmap`` ``None``:
    by the plan alone, the gradients not yet known)."""
    if g.kind not in _KINDS or g.block is not None or len(g.members) < 2:
        return None
    calls, seen, role = [], set(), None
    for c, ui in g.members:
        if not isinstance(c.rule, CellRule) or id(c) in seen or len(c.taps) != 1:
            return None
        if c.uses[ui].transposed or (gmap is not None and gmap.get(id(c.taps[0].handle)) is None):
            return None
        r = c.data["roles"][ui]
        if role is None:
            role = r
        elif r != role:
            return None
        seen.add(id(c))
        calls.append(c)
    modes = {c.data["mode"] for c in calls}
    return calls if len(modes) == 1 else None


def _sequence(calls: list) -> dict:
    """The calls' inputs ``X`` and states ``H`` stacked ``(N, T, *)`` (and for the GRU the
    scale of the hidden side's gate gradient), formed once per step and kept in the first call's
    data by the calls' ids."""
    key = tuple(map(id, calls))
    d0 = calls[0].data
    seq = d0.get("seq")
    if seq is not None and seq["key"] == key:
        return seq
    ds = [c.data for c in calls]
    seq = {"key": key, "X": torch.stack([d["x"] for d in ds], 1),
           "H": torch.stack([d["h"] for d in ds], 1), "r": None}
    if d0["mode"] == "GRU":
        seq["r"] = _reset_gates(ds, seq["H"])
    d0["seq"] = seq
    return seq


def _reset_gates(ds: list, H: torch.Tensor) -> torch.Tensor:
    """The GRU's reset gates ``r = sigmoid(gi_r + W_hr h + b_hr)`` of every call, ``(N, T, H)``:
    those the forward kept (:mod:`fimfast.rules.cell_steps`), else one product over the stacked
    states (each call's own ``W_hh``, ``b_hh``: those of a
    functional cell may differ per call, as computed weights)."""
    if all(d.get("r_fwd") is not None for d in ds):  # kept by the forward (cell_steps)
        return torch.stack([d["r_fwd"] for d in ds], 1)
    Hd = H.shape[-1]
    w, b = ds[0]["w_hh"], ds[0]["b_hh"]
    same = all(_same(d["w_hh"], w) and _same(d["b_hh"], b) for d in ds)
    with torch.no_grad():
        gi = torch.stack([d["gi"][:, :Hd] for d in ds], 1)
        if not same:
            pre = torch.stack([F.linear(d["h"], d["w_hh"][:Hd], None if d["b_hh"] is None
                                        else d["b_hh"][:Hd]) for d in ds], 1)
            return torch.sigmoid(pre + gi)
        # one product added into the stacked input gates, the sigmoid in place (no temporaries:
        # 0.39 against 0.47 ms for 64 x 16 states of 128, 1 thread)
        flat = gi.view(-1, Hd)
        flat.addmm_(H.reshape(-1, Hd), w[:Hd].t())
        if b is not None:
            flat.add_(b[:Hd])
        return gi.sigmoid_()


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two detached weights are views of the same memory laid out alike."""
    if a is None or b is None:
        return a is b
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(),
                                                           b.dtype)


def _stacked(calls: list, gmap: dict, seq: dict, hidden: bool, chunk: dict) -> torch.Tensor:
    """``P`` ``(M, N, T, gates * H)`` of this chunk (``hidden``, for the GRU: the candidate rows
    of ``P_h``, ``P`` times ``r`` there, ``(M, N, T, H)``), formed once for the groups that read
    it. ``P`` is stacked into rows padded by 64 bytes where a row's bytes are a multiple of 1024
    (:func:`_padded`)."""
    key = (tuple(map(id, calls)), hidden and seq["r"] is not None)
    hit = chunk.get(key)
    if hit is not None:
        return hit
    if key[1]:
        P = _stacked(calls, gmap, seq, False, chunk)
        out = P[..., 2 * seq["r"].shape[-1] :] * seq["r"]
    else:
        out = _padded([_position(c, gmap) for c in calls])
    chunk[key] = out
    return out


def _padded(ps: list) -> torch.Tensor:
    """The positions ``ps`` (each ``(M, N, O)``) stacked ``(M, N, T, O)``, a view into rows of
    ``O`` plus 64 bytes where ``O``'s bytes are a multiple of 1024 (on the CPU): the
    per-sample products (:func:`fimfast.ops.shared_sq`) read ``P[m, n, :, rows]`` across the
    positions, and a row stride of a multiple of 1024 bytes maps those reads to a few cache
    sets (1 thread, 64
    samples of 16 positions against 128 inputs: 1.84 against 1.31 ms for 512 rows, 4.1 against
    2.8 ms for 1024, 0.70 against 0.66 ms for 256). The fused CPU kernel now packs the rows it
    reads (``csrc/cpu/shared_sq_fused.cpp``), which leaves 1.38 against 1.28 ms for 512 rows; the
    padding costs nothing here (the positions are stacked anyway) and is kept."""
    M, N, O = ps[0].shape
    pad = 64 // ps[0].element_size()
    if (O * ps[0].element_size()) % 1024 or not pad or ps[0].device.type != "cpu":
        return torch.stack(ps, 2)
    buf = ps[0].new_empty(M, N, len(ps), O + pad)
    out = buf[..., :O]
    for t, p in enumerate(ps):
        out[:, :, t].copy_(p)
    return out
