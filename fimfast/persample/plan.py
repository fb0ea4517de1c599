"""Planning: which parameter takes the fast path (in which group of uses) and which the generic one.

A plan depends only on the structure of a step (its captured calls, their uses and verdicts, the
parameters' edges in the autograd graph, the logits layer): it is built once per structure
(:func:`build`), kept as a :class:`_Template` and bound to the calls of later steps.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from itertools import repeat
from typing import Any, NamedTuple

import torch

from fimfast import hooks
from fimfast.persample.probe import probe
from fimfast.rules.base import UseKind


class GroupKind(str, Enum):
    """How a group's terms are added up and squared (a ``str``: ``GroupKind.VEC == "vec"``)."""

    VEC = "vec"  #: per-unit gradients (:class:`~fimfast.rules.Vec`), squared as they are
    OUTER = "outer"  #: ``sum_t P (x) Q`` (:class:`~fimfast.rules.Outer`), squared per sample
    ROWS = "rows"  #: embedding rows (:class:`~fimfast.rules.Rows`), segment sums by id
    OUTER_ROWS = "outer+rows"  #: a table tied to a linear weight: both, plus their cross term
    HEAD_W = "head_w"  #: weight of the logits layer, in closed form (no backward column)
    HEAD_B = "head_b"  #: bias of the logits layer, in closed form

    __hash__ = str.__hash__  # hash like the plain string

    def __str__(self) -> str:
        return self.value


HEAD_KINDS = (GroupKind.HEAD_W, GroupKind.HEAD_B)
UNREACHED = "its output does not reach the logits through autograd"


class RowIndex(NamedTuple):
    """The distinct (sample, id) pairs of a :class:`~fimfast.rules.Rows` group, once per step."""

    inv: torch.Tensor  #: each position's pair (of the flattened ``(N * S)`` ids)
    rid: torch.Tensor  #: each pair's row of the table
    count: int  #: number of pairs
    segments: int  #: ``count``, plus one collecting the positions that do not count, if any


@dataclass
class GroupState:
    """What a group carries from one chunk of columns to the next within a step.

    Attributes:
        S: deferred square of a layer without weight sharing: ``sum`` over the columns so far of
            the squared output gradients ``(N, O)`` (see :func:`.squares.finish`).
        Q: its input side ``(N, I)``.
        root: ``S`` is a single column as it came (``sq_matmul`` squares it at the end).
        single: this step has one backward column in all.
        Qcat: the concatenated input sides of several uses (the same for every chunk).
        rows: the (sample, id) pairs of a rows group.
        partner: for the bias of a Linear layer, the weight's group whose ``S`` it is read from
            at the end of the step (``sum_n S_n``, :func:`.squares.finish`); ``False`` once a
            chunk added the bias's squares itself (see :func:`.squares.linear_lane`).
        cell: the pairs' products of a looped cell's weights, added up over the chunks and
            multiplied at the end of the step (:mod:`.cell_lane`).
    """

    S: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    root: bool = False
    single: bool = False
    Qcat: torch.Tensor | None = None
    rows: RowIndex | None = None
    partner: Group | bool | None = None
    cell: dict | None = None


@dataclass
class Group:
    """The uses of one block of one parameter that the rules add up and square together.

    Attributes:
        index: the parameter's position in the step's parameter list.
        block: the rows ``(start, stop)`` of the parameter's first dim these uses fill (``None``:
            all of it).
        kind: how the terms are added up and squared.
        members: the ``(call, use index)`` pairs.
        state: what the group carries across the chunks of one step.
    """

    index: int
    block: tuple[int, int] | None
    kind: GroupKind
    members: list[tuple[hooks.Call, int]]
    state: GroupState = field(default_factory=GroupState)

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(I, O)`` (Hugging Face ``Conv1D``)."""
        c, ui = self.members[0]
        return c.uses[ui].transposed


@dataclass
class Plan:
    """Which parameter goes where for one step (kept as ``Engine.last_plan`` for inspection).

    Attributes:
        groups: the fast groups.
        generic: indices of the parameters on the generic path.
        unused: indices of the parameters that do not reach the logits (their Fisher is 0).
        calls: captured calls whose taps the batched backward needs.
        head: the call whose output is the logits, if any.
        reasons: why each generic parameter is generic.
        lanes: the layout of a one-column step of plain Linear lanes
            (:func:`fimfast.persample.onecol.layout`), ``None`` where the general chunks run.
        pullbacks: the parameters used through weights computed from them
            (:class:`fimfast.derived_weights.Pullback`).
    """

    groups: list[Group] = field(default_factory=list)
    generic: list[int] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)
    calls: list[hooks.Call] = field(default_factory=list)
    head: hooks.Call | None = None
    reasons: dict[int, str] = field(default_factory=dict)
    lanes: tuple | None = None
    pullbacks: list = field(default_factory=list)

    @property
    def fast(self) -> list[int]:
        """Indices of the parameters estimated by rules."""
        return sorted({g.index for g in self.groups}
                      | {i for pb in self.pullbacks for i in pb.thetas})


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] < b[1] and b[0] < a[1]


def _structure(
    calls: list[hooks.Call], head, params: list[torch.Tensor], glob: Counter, N: int
) -> tuple:
    """What a plan depends on, as a key: per call its module (and mode, and whether a norm
    normalised with the batch's statistics: an eval-mode BatchNorm without running statistics
    couples the samples as in train mode), verdict so far, uses and tap layout; whether it is
    the logits layer; the parameters and their edges in the graph; whether the batch has two
    samples (else nothing was probed)."""
    per_call = []
    for c in calls:  # (loops, not generators: this runs at every step)
        taps = []
        for t in c.taps:
            cands = t.cands
            taps.append((t.lead, cands, len(t.shape) if len(cands) < 2 else tuple(t.shape),
                         getattr(t, "routing", None)))  # a routed call with no rows: routed.py
        per_call.append((
            id(c.module), id(c.rule), c.module.training, c.data.get("stats", 0) is None, c.ok,
            c.reason, c is head,
            hooks.uses_key(c.uses) if c.uses_key is None else c.uses_key, tuple(taps),
        ))
    ids = tuple(map(id, params))
    glob_ids = tuple(map(glob.get, ids, repeat(0)))
    return N >= 2, tuple(per_call), ids, glob_ids, chain_key(calls)


@dataclass
class _Template:
    """A :class:`Plan` with calls replaced by their positions in the step, plus every call's
    verdict and tap batch dims, to be bound to the calls of a later step of the same structure."""

    verdicts: list[tuple[bool, str, list[int | None]]]
    groups: list[tuple[int, tuple[int, int] | None, GroupKind, list[tuple[int, int]]]]
    generic: list[int]
    unused: list[int]
    reasons: dict[int, str]
    calls: list[int]
    head: int | None
    lanes: tuple | None = None  # fimfast.persample.onecol.layout of the plan
    program: Any = None  # fimfast.persample.prepared.Program of it (False: none), made once

    @classmethod
    def of(cls, plan: Plan, calls: list[hooks.Call]) -> _Template:
        at = {id(c): k for k, c in enumerate(calls)}
        return cls(
            [(c.ok, c.reason, [t.bdim for t in c.taps]) for c in calls],
            [(g.index, g.block, g.kind, [(at[id(c)], ui) for c, ui in g.members])
             for g in plan.groups],
            list(plan.generic),
            list(plan.unused),
            dict(plan.reasons),
            [at[id(c)] for c in plan.calls],
            None if plan.head is None else at[id(plan.head)],
        )

    def bind(self, calls: list[hooks.Call]) -> Plan:
        for c, (ok, reason, bdims) in zip(calls, self.verdicts):
            c.ok, c.reason = ok, reason
            for t, b in zip(c.taps, bdims):
                t.bdim = b
        return Plan(
            groups=[Group(i, block, kind, [(calls[k], ui) for k, ui in ms])
                    for i, block, kind, ms in self.groups],
            generic=list(self.generic),
            unused=list(self.unused),
            calls=[calls[k] for k in self.calls],
            head=None if self.head is None else calls[self.head],
            reasons=dict(self.reasons),
            lanes=self.lanes,
        )


def _unique(it: Iterable[hooks.Call]) -> list[hooks.Call]:
    seen: dict[int, hooks.Call] = {}
    for c in it:
        seen.setdefault(id(c), c)
    return list(seen.values())


def check_taps(
    cap: hooks.Capture, graph: hooks.Graph, N: int, direct: set, hold: set, modified: set
) -> None:
    """Every call's verdict from this step's forward: global hooks, taps that do not reach the
    logits or were modified in place; each tap's candidate batch dims (leading dims of size
    ``N``). ``direct``, ``hold`` and ``modified`` learn which module outputs are tapped directly,
    held alive in the next step, or never held again."""
    nodes = graph.nodes
    for c in cap.calls:
        if c.ok and cap.global_hooks:
            c.ok, c.reason = False, "a global forward hook may change layer outputs"
        if c.ok:
            for t in c.taps:
                fn = t.handle.grad_fn  # a node of the walk: reached (else the full check)
                if (fn is None or fn not in nodes) and not graph.reaches(t.handle):
                    # e.g. a module inside a torch.compile'd region: its hooks ran while tracing
                    c.ok, c.reason = False, UNREACHED
                    break
        for t in c.taps:
            changed = t.modified()
            t.keep = None
            if changed:
                direct.discard(t.key)
                hold.discard(t.key)
                modified.add(t.key)
                if t.direct and c.ok:
                    c.ok, c.reason = False, "its output was modified in place"
            elif not t.direct:
                if changed is False:
                    direct.add(t.key)
                    hold.discard(t.key)
                elif t.key not in modified:  # gone already: hold it in the next step
                    hold.add(t.key)
            shape = t.shape
            span = 1 if t.batch_first else min(t.lead, len(shape))
            if span == 1:
                t.cands = (0,) if shape[0] == N else ()
            else:
                t.cands = tuple(d for d in range(span) if shape[d] == N)
            t.bdim = t.cands[0] if t.cands else None
            if not t.cands and c.ok:
                c.ok, c.reason = False, "no dimension of the layer output is the batch"


def find_head(cap: hooks.Capture, logits: torch.Tensor) -> hooks.Call | None:
    """The call whose single, unmodified output is the logits (its batch dim is 0), if any."""
    head = None
    for c in cap.calls:
        t = c.taps[0] if len(c.taps) == 1 else None
        if (c.ok and t is not None and t.out() is logits and not t.modified()
                and type(t) is hooks.Tap):  # (a routed call's rows are not the logits' rows)
            head = c
            c.taps[0].bdim = 0
    return head


def build(calls, head, rows, params, glob, head_closed, probe_cache: dict, shape: int = 0
          ) -> Plan:
    """The plan of a new structure: candidates, the probe of their calls (``shape``: the graph's,
    :func:`fimfast.persample.walk.shape`), then the groups."""
    n = len(params)
    N = rows.num_samples
    plan = Plan()
    uses, internal, unreached = _uses(calls, params)
    cand = _candidates(plan, params, glob, uses, internal, unreached)
    probe_calls = _unique(c for i in cand for c, _ in uses[i] if c is not head)
    if probe_calls and N >= 2:
        probe(probe_calls, rows, probe_cache, shape)
        for i in list(cand):
            bad = [c for c, _ in uses[i] if not c.ok]
            if bad:
                cand.discard(i)
                plan.reasons[i] = bad[0].reason

    for i in sorted(cand):
        groups = groups_of(i, uses[i], head_closed)
        if groups is None:
            plan.reasons[i] = "its uses cannot be combined by the rules"
        else:
            plan.groups.extend(groups)
    fast = set(plan.fast)
    plan.generic = [i for i in range(n) if i not in fast and i not in plan.unused]
    plan.head = head
    plan.calls = _unique(
        c
        for g in plan.groups
        if g.kind not in HEAD_KINDS
        for c, _ in g.members
        if c is not head
    )
    return plan


def _uses(calls, params) -> tuple[dict[int, list[tuple[hooks.Call, int]]], Counter, set]:
    """Per parameter index its ``(call, use index)`` pairs; per parameter id its edges inside
    captured calls; the ids of the parameters of calls whose output does not reach the logits.

    Such a call (its output detached, or used only for a statistic under ``.detach()``) adds no
    edge to the logits' graph and nothing to the Fisher: it is left out, and the parameter's
    other calls must still account for all of its edges (a call inside a ``torch.compile``'d
    region, whose hooks ran while tracing, leaves its edges unaccounted: generic path)."""
    pos = {id(p): i for i, p in enumerate(params)}
    internal: Counter = Counter()
    uses: dict[int, list[tuple[hooks.Call, int]]] = defaultdict(list)
    unreached: set[int] = set()
    for c in calls:
        if c.reason == UNREACHED:
            unreached.update(id(u.param) for u in c.uses)
            continue
        internal.update(c.internal or {})
        for ui, u in enumerate(c.uses):
            uses[pos[id(u.param)]].append((c, ui))
    return uses, internal, unreached


def _candidates(plan: Plan, params, glob, uses, internal, unreached) -> set[int]:
    """The parameters the rules may estimate; the others get their reason (or go to unused)."""
    cand: set[int] = set()
    for i, p in enumerate(params):
        e = glob[id(p)]
        if e == 0:
            plan.unused.append(i)
        elif internal[id(p)] != e and id(p) in unreached:
            plan.reasons[i] = UNREACHED
        elif i not in uses:
            plan.reasons[i] = "no rule for its module"
        elif internal[id(p)] != e:
            plan.reasons[i] = "used outside the captured layer calls"
        elif not all(c.ok for c, _ in uses[i]):
            plan.reasons[i] = next(c.reason for c, _ in uses[i] if not c.ok)
        else:
            cand.add(i)
    return cand


def groups_of(i, members, head) -> list[Group] | None:
    """The groups of parameter ``i``'s uses (one per block), or ``None`` when the rules cannot
    add them up (overlapping blocks, a weight stored both ways round, mixed kinds, uses through
    functions of the parameter with different derivatives, or mixed with uses of the parameter
    itself: its squares are scaled as a whole, see :func:`scale_chained`)."""
    if len(members) > 1 and any(c.uses[ui].chain is not None for c, ui in members) and (
        not _same_chain([c.uses[ui].chain for c, ui in members])
    ):
        return None
    byblock: dict[Any, list] = defaultdict(list)
    for c, ui in members:
        byblock[c.uses[ui].block].append((c, ui))
    keys = list(byblock)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            if _overlap(keys[a], keys[b]):
                return None
    out = []
    for block, ms in byblock.items():
        kinds = {c.uses[ui].kind for c, ui in ms}
        groups = {c.uses[ui].groups for c, ui in ms}
        trans = {c.uses[ui].transposed for c, ui in ms}
        if len(trans) > 1 or (True in trans and kinds != {UseKind.OUTER}):
            return None  # one weight stored both ways round: the squares cannot add up
        if kinds == {UseKind.VEC}:
            kind = GroupKind.VEC
        elif kinds == {UseKind.OUTER} and len(groups) == 1:
            kind = GroupKind.OUTER
        elif kinds == {UseKind.ROWS}:
            kind = GroupKind.ROWS
        elif kinds == {UseKind.OUTER, UseKind.ROWS} and groups == {1} and block is None:
            kind = GroupKind.OUTER_ROWS
        else:
            return None
        if (
            len(ms) == 1
            and ms[0][0] is head
            and head.rule.closed_form_head
            and kind in (GroupKind.VEC, GroupKind.OUTER)
        ):
            kind = GroupKind.HEAD_W if kind == GroupKind.OUTER else GroupKind.HEAD_B
        out.append(Group(i, block, kind, ms))
    return out


def _same_chain(chains: list) -> bool:
    """Whether the chains of a parameter's uses are one derivative (the same tensor, or equal
    values): its per-sample gradient is then ``chain * sum`` over the uses of their terms
    (docs/math.md §4), which the engine squares once and scales by ``chain**2``."""
    first = chains[0]
    if first is None:
        return False
    return all(
        c is first or (c is not None and c.shape == first.shape and torch.equal(c, first))
        for c in chains[1:]
    )


def chain_key(calls: list[hooks.Call]) -> tuple:
    """Per parameter used through functions of it by several calls, whether their chains agree
    (:func:`_same_chain`): part of the step's structure, read at every step (a plan whose
    chains agreed is not reused for a step where they differ)."""
    chains: dict[int, list] = {}
    for c in calls:
        for u in c.uses:
            if u.chain is not None:
                chains.setdefault(id(u.param), []).append(u.chain)
    return tuple((k, _same_chain(v)) for k, v in chains.items() if len(v) > 1)


def scale_chained(groups: list[Group], acc) -> None:
    """Scale the sums of the parameters used through an elementwise function of them
    (``hooks.Use.chain``, one derivative for all their uses: :func:`groups_of`) by the squared
    derivative."""
    for g in groups:
        c, ui = g.members[0]
        chain = c.uses[ui].chain
        if chain is not None:
            acc.scale(g.index, chain)
