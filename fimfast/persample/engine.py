"""The per-sample engine: plan the step, then the generic path and the fast path's chunks.

See the package docstring (:mod:`fimfast.persample`) for the method and docs/exactness.md for
when the fast path is exact.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fimfast import chunks, hooks, pullback
from fimfast import derived_weights as dw
from fimfast.batch_sums import Sums
from fimfast.ops import registry
from fimfast.persample import cell_lane, held, norm_lane, onecol, rnn_lane, squares, stream
from fimfast.persample import plan as planning
from fimfast.persample.columns import Columns
from fimfast.persample.generic import _batched_grads, accumulate_columns
from fimfast.persample.plan import (
    HEAD_KINDS,
    Group,
    GroupKind,
    GroupState,
    Plan,
    _structure,
    _Template,
)
from fimfast.persample.probe import refolds
from fimfast.persample.replay import Replay, _refuse_hidden
from fimfast.persample.walk import shape as graph_shape
from fimfast.persample.walk import walk as tap_walk
from fimfast.step import Step
from fimfast.types import Options
from fimfast.zero_gates import ZeroWatch

log = logging.getLogger("fimfast.persample")


class Engine(Replay):
    """The per-sample engine of one estimator (holds the independence-probe cache).

    Attributes:
        use_rules: ``False`` sends every parameter to the generic path (the reference).
        expand_broadcast: expand lookups shared by the batch during the capture (turned off
            after a forward that fails with them expanded).
        expand_flat: also expand lookups with ids of shape ``(T,)`` (turned off when the checked
            forward's logits differ from the model's own; see :meth:`forward`).
        last_plan: the :class:`Plan` of the last step.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_plan: Plan | tuple | None = None
        self._probe_cache: dict[Any, Any] = {}
        self._plans: dict[Any, _Template] = {}  # plans by step structure (see _structure)
        self._zeros = ZeroWatch()  # parameters entirely zero when the plans were made
        self._logged: dict[int, str] = {}
        self.sequence_rows = False  # this step's rows are whole sequences (see Options)
        self.stream_batched = True  # chunks of several columns may stream (see _columns)

    @property
    def last_plan(self) -> Plan | None:
        """The :class:`Plan` of the last step (a prepared step keeps its template and calls:
        bound on first read, :mod:`fimfast.persample.prepared`)."""
        plan = self._last_plan
        if type(plan) is tuple:
            plan = self._last_plan = plan[0].bind(plan[1])
        return plan

    @last_plan.setter
    def last_plan(self, plan: Plan | tuple | None) -> None:
        self._last_plan = plan

    # -- planning --------------------------------------------------------------------------- #
    def _plan(self, cap: hooks.Capture | None, rows, params: list[torch.Tensor]) -> Plan:
        pre = self._prelude(cap, rows, params)
        return pre if type(pre) is Plan else self._planned(cap, rows, *pre)

    def _prelude(self, cap: hooks.Capture | None, rows, params: list[torch.Tensor]):
        """The checks of this step's forward and the key of its structure: ``(found, glob,
        params, n, head, key)`` for :meth:`_planned`, or the plan itself when no call was
        captured (every parameter on the generic path)."""
        if self._zeros.moved(params):  # a zero gate moved: a coupling behind it may now be seen
            self._plans.clear()
            self._probe_cache.clear()
        found = self.weights.take(cap)  # weights computed from parameters (derived_weights)
        n = len(params)
        if found:
            graph = dw.walk(rows.flat, params, {f[3]: f[1] for f in found})
            params = [*params, *(f[1] for f in found)]
        else:
            graph = tap_walk(rows.flat, params, cap)
        _refuse_hidden(cap, graph)
        if cap is None or not cap.calls:
            generic = list(range(len(params)))
            return Plan(generic=generic, reasons=dict.fromkeys(generic, "no captured call"))
        N = rows.num_samples
        planning.check_taps(cap, graph, N, self._direct, self._hold, self._modified)
        held.check(cap)  # layer inputs written in place after the call
        head = planning.find_head(cap, rows.logits)
        glob = graph.edges
        # everything below depends only on the structure of this step's calls: reused from the
        # last step with the same calls, uses, verdicts, parameter edges and head
        key = (_structure(cap.calls, head, params, glob, N), self.sequence_rows,
               graph_shape(graph))
        if refolds(cap.calls):  # rows folded by size only: planned afresh (probe.refolds)
            key = (*key, object())
        return found, glob, params, n, head, key

    def _planned(self, cap: hooks.Capture, rows, found, glob, params, n, head, key) -> Plan:
        """The plan of a step whose :meth:`_prelude` gave the other arguments."""
        hit = self._plans.get(key)
        if hit is not None:
            plan = hit.bind(cap.calls)
        else:
            # per-sequence rows: the head's squares do not split by token
            head_closed = None if self.sequence_rows else head
            plan = planning.build(cap.calls, head, rows, params, glob, head_closed,
                                  self._probe_cache, key[2])
            self._zeros.note(params[:n])
            if len(key) > 3:  # a plan of this step only (rows folded by size: refolds)
                plan.lanes = onecol.layout(plan)
            else:
                if len(self._plans) > 64:
                    self._plans.clear()
                self._plans[key] = tmpl = _Template.of(plan, cap.calls)
                tmpl.lanes = plan.lanes = onecol.layout(plan)  # decided once per structure
        if found:
            dw.settle(plan, params[:n], found, glob, head)
            # settle rewrites the groups and calls the lanes index: the general chunks run
            plan.lanes = None
        return plan

    # -- the step ----------------------------------------------------------------------------- #
    def estimate(
        self, step: Step, cap: hooks.Capture | None, pre: tuple | None = None
    ) -> list[torch.Tensor] | Sums:
        """This batch's per-sample estimate, one fresh float tensor per parameter; with
        ``step.defer_square``, a :class:`~fimfast.batch_sums.Sums` when it keeps squared products or
        table rows for the state to fold (:meth:`fimfast.state.State.commit`).

        The estimate path of EXACT, EMPIRICAL and MONTE_CARLO (the contract: :mod:`fimfast.step`;
        ``step.names`` name the parameters in the log line of those on the generic path, logger
        ``fimfast.persample``, level INFO, once per change).

        Args:
            step: the step (``step.rows`` with logits attached to the graph).
            cap: the capture of this step's forward (``None``: generic path only).
            pre: what :meth:`_prelude` gave for this step already (the prepared step's checks:
                :mod:`fimfast.persample.prepared`), else ``None``.
        """
        rows, params, opts = step.rows, step.params, step.opts
        acc = Sums([p.shape for p in params], step.dtypes, [p.device for p in params])
        acc.fold = step.defer_square and _folds(opts.backend, rows.flat.device)
        retain_graph = step.retain_graph
        flat = rows.flat
        R, C = flat.shape
        # the logits as the row checks detached them, when they are the rows (N, C)
        plain = rows.detached if rows.all_valid and rows.logits.dim() == 2 else flat
        cols = Columns(plain, rows.labels, step.fim_type, opts, step.seed, step.offset)
        self.sequence_rows = bool(opts.sequence_rows) and rows.logits.dim() == 3
        if pre is None:
            plan = self._plan(cap, rows, params)
        else:
            plan = pre if type(pre) is Plan else self._planned(cap, rows, *pre)
        self.last_plan = plan
        if cap is not None:
            self._log_generic(plan, len(params), step.names)
        if plan.generic:
            gp = [params[i] for i in plan.generic]
            ga = [acc.get(i) for i in plan.generic]
            chunk = chunks.generic_columns(R, C, gp, cols.num, opts.class_chunk)
            group = rows.sample if self.sequence_rows else None
            try:
                accumulate_columns(flat, gp, cols.blocks(chunk), ga, group=group)
            except RuntimeError as e:  # torch's refusal of an input written after its call
                held.refuse(e, plan, step.names)
                raise
        if plan.groups or plan.pullbacks:  # parameters reached only through computed
            try:  # weights (every weight normalized, no biases) are pullbacks alone
                self._fast(rows, params, plan, cols, opts, acc, retain_graph)
            except stream.Unbatched:
                # the batched backward cannot run with hooks on this model: the fast groups
                # again (the graph was retained), their chunks of columns not streamed
                self.stream_batched = False
                acc = _fresh(acc, plan, params, step)
                self._fast(rows, params, plan, cols, opts, acc, retain_graph)
        if step.defer_square and (acc.products or acc.rows):
            return acc  # the state folds the kept products and rows (Sums.fold_into)
        return acc.tensors()

    def _log_generic(self, plan: Plan, n: int, names: list[str] | None) -> None:
        """Once per change: which parameters take the slow path, and why."""
        if not plan.generic and not self._logged:
            return  # none, as in the last step
        generic = {i: plan.reasons.get(i, "") for i in plan.generic}
        if generic != self._logged:
            self._logged = generic
            if generic:
                log.info(
                    "per-sample engine: %d of %d parameters take the generic path: %s",
                    len(generic), n,
                    "; ".join(f"{names[i] if names else i}: {r}" for i, r in generic.items()),
                )

    # -- the fast path ------------------------------------------------------------------------ #
    def _fast(
        self, rows, params, plan: Plan, cols: Columns, opts: Options, acc, retain_graph: bool
    ) -> None:
        """The fast groups: the logits layer in closed form, then chunks of backward columns to
        the taps, whose gradients the rules turn into terms that :mod:`.squares` squares."""
        flat = rows.flat
        backend = opts.backend
        head = plan.head
        planning.scale_chained(plan.groups, acc)
        # the logits layer in closed form: no backward column at all
        squares.head_closed_form(plan.groups, rows, cols, acc, backend)
        token = rows.logits.dim() == 3 and not self.sequence_rows
        if (plan.lanes is not None and not plan.pullbacks and cols.num == 1
                and cols.block is not None and not token):
            self.add_taps = False  # one column: not streamed
            self.columns = 1
            onecol.run(rows, plan, cols, acc, retain_graph, backend)
            return
        groups = [g for g in plan.groups if g.kind not in HEAD_KINDS]
        pulls = plan.pullbacks  # parameters used through computed weights (fimfast.pullback)
        if not groups and not pulls:
            return
        taps = [t for c in plan.calls for t in c.taps]
        need_head = any(c is head for g in [*groups, *(g for pb in pulls for g in pb.groups)]
                        for c, _ in g.members)
        if token or cols.num > 1:
            kk, tt, rpos = _schedule(rows, cols) if token else (None, None, None)
            total = cols.num if kk is None else kk.numel()
            head_logits = rows.logits.numel() if need_head else None
            M_max, streams = _columns(flat, taps, head_logits, opts.class_chunk,
                                      sum(p.numel() for p in params), total, self.stream_batched)
            if not opts.class_chunk:  # cells whose weights take pairs: plain, more columns
                more = cell_lane.columns(groups, taps, 1 if streams else M_max, total)
                if more > 1:
                    M_max, streams = more, False
        else:  # one column (EMPIRICAL, one draw of MONTE_CARLO): one backward, as it is
            kk, total, M_max, streams = None, 1, 1, False
        if pulls and streams:  # the pullbacks need every gradient of a chunk at once
            M_max, streams = 1, False
        for g in groups:
            g.state.single = total == 1
        self.columns = M_max  # batched in one backward: the next forward's cells (cell_steps)
        # a streamed step (:mod:`.stream`) forms each call's squares as its gradients arrive, and
        # the next forward taps every output by an add, whose gradient need not be kept
        self.add_taps = streams
        for c in plan.calls:
            c.chunks = -(-total // M_max)
        for s in range(0, total, M_max):
            if kk is None:
                cot = cols.span(s, min(total, s + M_max))
            else:
                cot = cols.take(kk[s : s + M_max])
            if token:
                cot *= (rpos.unsqueeze(0) == tt[s : s + M_max].unsqueeze(1)).unsqueeze(-1)
            if cot.dtype != flat.dtype:
                cot = cot.to(flat.dtype)
            retain = retain_graph or s + M_max < total  # a later chunk needs the graph
            if streams:
                _stream(rows, plan.calls, groups, cot, retain, head if need_head else None,
                        acc, backend)
                continue
            gmap = _tap_grads(rows, taps, cot, retain, head if need_head else None)
            del cot
            _chunk(groups, gmap, acc, backend)
            pullback.chunk(pulls, gmap, acc, params)
            del gmap
        pullback.finish(pulls, acc, params)
        cell_lane.finish(groups, acc)
        squares.finish(groups, acc, backend)


def _columns(flat, taps, head_logits, class_chunk, P: int, total: int,
             batched: bool) -> tuple[int, bool]:
    """``(columns per backward, streamed)`` for ``total`` columns: as many as the memory bound
    of a plain batched backward allows (:func:`fimfast.chunks.fast_columns`), spread evenly over
    the chunks (:func:`fimfast.chunks.balanced`); where that is one column, the backward streams
    its squares (:mod:`.stream`), with as many columns as the streamed bound allows when
    ``batched`` (the engine's :attr:`Engine.stream_batched`) and
    :func:`.stream.batched_hooks_work`. Measured on CPU (1 thread), streaming costs more than a
    few more plain chunks (add taps, hooks): MLP (a) 2.54x a training step in three plain chunks,
    2.67x in two streamed ones, 2.45x in one plain backward of all 9 columns; its default, two
    plain chunks of 5 and 4 columns, 2.35x against 2.45x for three of 3."""
    plain = chunks.fast_columns(flat, taps, head_logits, class_chunk, P)
    if plain > 1 or total == 1:
        return chunks.balanced(total, plain), False
    streamed = 1
    if batched and stream.batched_hooks_work():
        streamed = chunks.fast_columns(flat, taps, head_logits, class_chunk, P, streamed=True)
    return chunks.balanced(total, streamed), True


def _fresh(acc: Sums, plan: Plan, params, step: Step) -> Sums:
    """A new accumulator holding only ``acc``'s generic parameters, and fresh group states: the
    fast path starts over."""
    fresh = Sums([p.shape for p in params], step.dtypes, [p.device for p in params])
    fresh.fold = acc.fold
    for i in plan.generic:
        fresh.slots[i] = acc.slots[i]
    for g in plan.groups:
        g.state = GroupState()
    return fresh


def _folds(backend: str | None, device: torch.device) -> bool:
    """Whether the squared products of this step run on the ``cpp`` backend, whose kernel is the
    BLAS product of the squares that the state may form itself (the ``torch`` reference is kept
    as it is; the ``cuda`` and ``triton`` kernels square on load). The choice is read through
    :func:`fimfast.ops.registry.bound` (one dict lookup once made, ``FIMFAST_BACKEND`` still read
    at every step) and told by the function it picks."""
    try:
        fn = registry.bound("sq_matmul", backend, device)
    except Exception:  # noqa: BLE001 - the op itself raises the error, where it runs
        return False
    return fn is (_CPP_SQ or _cpp_sq())[0]


def _cpp_sq() -> list:
    """``[the cpp backend's sq_matmul]`` (``None`` without the extension), kept in
    :data:`_CPP_SQ`."""
    try:
        from fimfast.ops.cpp import sq_matmul_cpp
    except ImportError:
        sq_matmul_cpp = None
    _CPP_SQ[:] = [sq_matmul_cpp]
    return _CPP_SQ


_CPP_SQ: list = []


def _schedule(rows, cols: Columns):
    """The backward columns of token-level logits in order (one per (class, position) pair):
    ``(kk, tt, rpos)``, the factor column of each, its position ``tt`` and every row's position
    ``rpos``. (Sample-level rows take the factor's columns in order: :meth:`Columns.span`.)"""
    dev = rows.flat.device
    T = rows.logits.shape[1]
    rpos = rows.index % T
    positions = torch.unique(rpos)
    kk = torch.arange(cols.num, device=dev).repeat_interleave(positions.numel())
    tt = positions.repeat(cols.num)
    return kk, tt, rpos


def _tap_grads(rows, taps, cot: torch.Tensor, retain: bool, head) -> dict[int, Any]:
    """One batched backward of the chunk ``cot`` (``(M, R, C)``) to the taps, by handle id; the
    logits layer's (``head``) output gradient is the cotangent itself, laid out as the logits."""
    gmap: dict[int, torch.Tensor | None] = {}
    if taps:
        grads = _batched_grads(rows.flat, [t.handle for t in taps], cot, retain_graph=retain)
        gmap = {id(t.handle): g for t, g in zip(taps, grads)}
    if head is not None:
        gmap[id(head.taps[0].handle)] = _head_grad(rows, cot)
    return gmap


def _head_grad(rows, cot: torch.Tensor) -> torch.Tensor:
    """The logits layer's output gradient: the cotangent laid out as the logits (a view of it
    when every row is valid: the rows are then the logits' rows in order)."""
    M, C = cot.shape[0], rows.flat.shape[1]
    if rows.all_valid:
        return cot.view(M, *rows.logits.shape)
    Gh = torch.zeros(M, rows.logits.numel() // C, C, dtype=cot.dtype, device=cot.device)
    Gh[:, rows.index] = cot
    return Gh.reshape(M, *rows.logits.shape)


def _stream(rows, calls, groups: list[Group], cot, retain: bool, head, acc: Sums, backend):
    """The backward of the chunk ``cot`` (``(M, R, C)``) with the squares formed while it runs
    (:func:`fimfast.persample.stream.stream`)."""
    stream.stream(rows, calls, groups, cot, retain, head,
                  lambda ready, gmap: _chunk(ready, gmap, acc, backend), _head_grad)


def _chunk(groups: list[Group], gmap: dict, acc: Sums, backend) -> None:
    """The rules' terms of one chunk (once per call), added up and squared per group."""
    terms: dict[int, list] = {}
    sq0: dict = {}  # sum over the chunk's columns of P^2, shared by a weight and its bias
    lanes: dict = {}  # calls whose weight took squares.linear_lane (their bias reads its S)
    norms: dict = {}  # the per-sample sums of channel norms by call (norm_lane)
    groups = cell_lane.run(groups, gmap, acc, backend)  # cells called several times
    groups = rnn_lane.run(groups, gmap, acc, backend)  # recurrent layers' steps
    for g in sorted(groups, key=lambda g: g.kind != GroupKind.OUTER):  # weights first
        if len(g.members) == 1 and (squares.linear_lane(g, gmap, acc, lanes, sq0)
                                    or norm_lane.take(g, gmap, acc, norms)):
            continue
        parts = []
        for c, ui in g.members:
            if id(c) not in terms:
                terms[id(c)] = c.rule.terms(c, [gmap.get(id(t.handle)) for t in c.taps])
            parts.append(terms[id(c)][ui])
        parts = [p for p in parts if p is not None]
        if parts:
            squares.accumulate(g, parts, acc, backend, sq0)
