"""The prepared one-column step: EMPIRICAL and one-draw MONTE_CARLO steps of a plain model, run
straight through.

:meth:`fimfast.DiagFisher.step` of a per-sample type goes through general layers: the batch
(:mod:`fimfast.batch`, :class:`fimfast.forward.Forward`), the captured forward
(:meth:`fimfast.persample.Replay.forward`), the estimate contract (:class:`fimfast.step.Step`),
the engine's plan (a :class:`fimfast.persample.plan.Plan` bound anew from its template at every
step, :class:`fimfast.persample.columns.Columns`), the closed-form logits layer and the chunks
(:func:`fimfast.persample.squares.head_closed_form`, :func:`fimfast.persample.onecol.run`). Each
decides again, at every step, what the estimator's configuration and the plan's structure
already told, and every decision reads Python objects that the model's forward and backward
evicted from the caches.

:func:`step` runs one configuration in one function: EMPIRICAL, or MONTE_CARLO with one draw,
the categorical likelihood, no ``lm_head`` nor ``forward_fn``, ``shift_labels`` not forced, a
model that is not a ``DistributedDataParallel`` or ``torch.compile`` wrapper, and batches
``(inputs, labels)`` of two tensors, the labels one per sample. Whether the configuration is one of
those is decided once (:class:`Prepared`, kept while the options and the parameter list stay the
same objects). The forward runs under the same capture as the general path, and every check
that protects exactness runs at every step, through the same functions: the parameter walk and
the state's parameter check, the buffer, gradient-hook and version guards
(:func:`fimfast.guard.step_kept`), the row checks, the autograd graph walk and the no-grad and
reentrant-checkpoint refusals, the tap checks (outputs modified in place, global forward hooks,
outputs that do not reach the logits) and the structure key of the plan
(:func:`fimfast.persample.plan._structure`). When that key names a plan template whose layers
are all one-column lanes (:func:`fimfast.persample.onecol.layout`), the step forms its squares
from a :class:`Program` made once per template: the closed-form logits layer and the lanes by
positions, no :class:`~fimfast.persample.plan.Plan` nor group object, the plan bound only when
:attr:`fimfast.persample.Engine.last_plan` is read. Anything else (another structure, a generic
parameter, a weight computed from parameters, invalid rows, a tap without gradient, a memory
budget that refuses a kept product) sends the step to the general code at the point reached, on
the same capture and gradients: results and errors are those of the general path, bit for bit
(tests/test_prepared_persample.py).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fimfast import _ext, distributed, guard, likelihoods
from fimfast import batch as batchlib
from fimfast.batch import _every_row
from fimfast.batch_sums import Sums
from fimfast.forward import CALL_ERRORS, _eager, call_failed
from fimfast.hutchinson import vjp
from fimfast.ops.registry import bound
from fimfast.ops.rng import as_int64
from fimfast.persample import onecol, squares
from fimfast.persample.engine import _folds
from fimfast.persample.lanes import Lanes
from fimfast.persample.plan import GroupKind, Plan
from fimfast.prepared import _DTENSOR, _PAIRS, _TENSOR
from fimfast.step import Step
from fimfast.types import FIMType

if TYPE_CHECKING:
    from fimfast.estimator import DiagFisher
    from fimfast.persample.plan import _Template

__all__ = ["Prepared", "Program", "step"]


class Prepared:
    """What the steps of one estimator configuration share, decided once.

    Attributes:
        opts: the options it was decided for (the estimator's :class:`fimfast.types.Options`).
        params: the parameter list it was decided for (by identity).
        ok: whether :func:`step` runs this configuration (else the general path does).
        mode: the mode of the score column (:func:`fimfast.ops.probe_logit_grad`).
        hot: the last step ran a :class:`Program`: the next one asks the extension for its row
            checks and score column in one call (:func:`_column`).
    """

    __slots__ = ("opts", "params", "ok", "mode", "hot")

    def __init__(self, est: DiagFisher, params: list[torch.Tensor]) -> None:
        o, model = est.opts, est.model
        self.opts, self.params, self.hot = o, params, False
        self.mode = "empirical" if est.fim_type == FIMType.EMPIRICAL else "mc"
        self.ok = (
            (est.fim_type == FIMType.EMPIRICAL
             or (est.fim_type == FIMType.MONTE_CARLO and o.num_probes == 1))
            and o.likelihood == "categorical"
            and o.forward_fn is None
            and o.lm_head is None
            and o.shift_labels is not True
            and o.class_dim in (None, -1, 1)
            and not distributed.is_ddp(model)
            and _eager(model) is model
        )


class _Side(NamedTuple):
    """What :func:`fimfast.persample.squares._weight_sq` reads of a group."""

    transposed: bool


class Program(NamedTuple):
    """The one-column step of a plan template, by positions in the step's captured calls.

    Attributes:
        calls: the positions of the plan's calls (whose taps the backward reaches).
        head: per closed-form group of the logits layer, in plan order, ``(parameter index,
            call position or None for a bias, weight layout)``.
        lanes: per lane of :func:`fimfast.persample.onecol.layout`, ``(tap, weight index, weight
            block, weight layout, weight's call, bias index, bias block)`` (``None`` for what is
            frozen).
    """

    calls: tuple[int, ...]
    head: tuple[tuple[int, int | None, _Side | None], ...]
    lanes: tuple[tuple, ...]

    @classmethod
    def of(cls, tmpl: _Template, calls: list) -> Program | None:
        """The program of ``tmpl`` (bound now to ``calls``, a step of its structure), or
        ``None`` when :func:`step` leaves it to the general path: no lanes, a generic
        parameter, no group, or a use through a function of its parameter (a chain)."""
        if tmpl.lanes is None or tmpl.generic or not tmpl.groups:
            return None
        for _, _, _, members in tmpl.groups:
            if any(calls[k].uses[ui].chain is not None for k, ui in members):
                return None

        def side(members) -> _Side:
            k, ui = members[0]
            return _Side(calls[k].uses[ui].transposed)

        head = []
        for index, _block, kind, members in tmpl.groups:
            if kind == GroupKind.HEAD_W:
                head.append((index, members[0][0], side(members)))
            elif kind == GroupKind.HEAD_B:
                head.append((index, None, None))
        lanes = []
        for ln in tmpl.lanes:
            w = None if ln.weight is None else tmpl.groups[ln.weight]
            b = None if ln.bias is None else tmpl.groups[ln.bias]
            lanes.append((
                ln.tap,
                None if w is None else w[0], None if w is None else w[1],
                None if w is None else side(w[3]), None if w is None else w[3][0][0],
                None if b is None else b[0], None if b is None else b[1],
            ))
        return cls(tuple(tmpl.calls), tuple(head), tuple(lanes))


def step(est: DiagFisher, batch: Any) -> bool:
    """``est.step(batch)`` for a prepared configuration (see the module docstring); ``False``,
    with nothing done, when the general path runs the step."""
    if type(batch) not in _PAIRS or len(batch) != 2 or est._head is not None:
        return False
    x, labels = batch
    if type(x) is not _TENSOR or type(labels) is not _TENSOR or labels.dim() != 1:
        return False
    model, o = est.model, est.opts
    names, params = est._walk.of(model)
    prep = est._prepared_ps
    if prep is None or prep.params is not params or prep.opts is not o:
        prep = est._prepared_ps = Prepared(est, params)
    checked = est._checked  # else _params checks the parameters against the state first
    if not prep.ok or names is not checked[0] or est.state is not checked[1]:
        return False
    eng = est._persample
    if not eng.use_rules or x.dim() <= o.batch_dim:
        return False
    mods = eng._modules(model, params)
    # lookups expanded to the batch, or the functional recording: the forward of Replay.forward
    if eng.expand_broadcast and (mods[1] or (eng.functional and not eng._quiet)):
        return False
    with guard.step_kept(est._guard, est._modules, model, names, params):
        eng._samples = int(labels.shape[0])  # 1-D labels: one sample per label
        flat = eng.expand_flat and eng._flat_checked
        with eng.capture(model, params, int(x.shape[o.batch_dim]), flat, mods) as cap:
            try:
                z = model(x)
            except CALL_ERRORS as exc:
                raise call_failed(exc, x, None) from exc
            block = None
            if type(z) is _TENSOR and z.dim() == 2:  # (N, C): no layout to resolve
                block = _column(est, prep, z, labels) if prep.hot else None
                if block is not None:  # every row valid (checked)
                    rows = _every_row(z, labels)
                else:
                    rows = batchlib.rows(z, labels, None, "categorical", o.ignore_index,
                                         est.fim_type == FIMType.EMPIRICAL)
            else:
                rows = est._forward_of(batch).rows_of(z, labels, None)
        if _DTENSOR in sys.modules:  # else no forward swaps the parameters (FSDP2 only)
            params = est._params_after_forward(params)
        with guard.arithmetic(rows.logits, retained=True):
            acc = _estimate(est, prep, eng, rows, params, cap, block)
    est._commit(acc, rows)
    return True


def _estimate(est: DiagFisher, prep: Prepared, eng, rows, params: list[torch.Tensor], cap,
              block: torch.Tensor | None):
    """The engine's estimate of this step (:meth:`fimfast.persample.Engine.estimate`): by the
    template's :class:`Program` where it applies (``block``: its score column, if formed
    already), else by the general code from here on."""
    general = rows.logits.dim() != 2 or not rows.all_valid
    pre = None
    if not general:
        eng.sequence_rows = False  # (N, C) logits: the rows are the samples
        pre = eng._prelude(cap, rows, params)
        if type(pre) is not Plan and not pre[0] and not eng._logged:
            tmpl = eng._plans.get(pre[5])
            prog = None if tmpl is None else _program(tmpl, cap.calls)
            if prog is not None:
                prep.hot = True
                return _run(est, eng, rows, params, cap, tmpl, prog, block)
    prep.hot = False
    st = Step(rows, params, est.fim_type, est.opts, est.seed, est.offset, est.state.dtypes,
              retain_graph=False, names=est.names, defer_square=True)
    return eng.estimate(st, cap, pre)


def _column(est: DiagFisher, prep: Prepared, z: torch.Tensor, labels: torch.Tensor):
    """The extension's one call for float32/float64 CPU logits whose score column the ``cpp``
    backend forms (csrc/one_column_step.cpp): ``None`` unless every row is valid, else the
    column as :func:`fimfast.likelihoods.score_columns` forms it, ``(1, N, C)``; ``None`` also
    without the extension or on another backend (the general row checks and column then)."""
    if not z.is_cpu or z.dtype not in _HOST_DTYPES:
        return None
    host = _HOST or _host()
    if host[0] is None or bound("probe_logit_grad", est.opts.backend, _CPU) is not host[1]:
        return None
    return host[0](z, labels, est.opts.ignore_index, prep.mode, as_int64(est.seed),
                   as_int64(est.offset))


def _host() -> list:
    """``[one_column_step of the extension, the cpp backend's probe_logit_grad]`` (``None`` for
    what is missing), looked up once and kept in :data:`_HOST`."""
    fn = _ext.host_function("one_column_step")
    try:
        from fimfast.ops.cpp import probe_logit_grad_cpp
    except ImportError:
        fn = probe_logit_grad_cpp = None
    _HOST[:] = [fn, probe_logit_grad_cpp]
    return _HOST


_HOST: list = []
_HOST_DTYPES = (torch.float32, torch.float64)  # their own compute dtype: no conversion first
_CPU = torch.device("cpu")


def _program(tmpl: _Template, calls: list) -> Program | None:
    """The template's program, made at its first prepared step (kept on the template: ``False``
    when the general path runs its steps)."""
    prog = tmpl.program
    if prog is None:
        prog = tmpl.program = Program.of(tmpl, calls) or False
    return prog or None


def _run(est: DiagFisher, eng, rows, params, cap, tmpl: _Template, prog: Program, block):
    """The estimate of ``prog``: what ``Engine.estimate`` forms for its template with one score
    column (the closed-form logits layer, then :func:`fimfast.persample.onecol.run`), the same
    operators on the same operands; the squares kept unformed for the extension to fold into the
    state where it can (:class:`fimfast.persample.lanes.Lanes`)."""
    o, calls = est.opts, cap.calls
    flat = rows.flat
    backend = o.backend
    acc = Lanes([p.shape for p in params], est.state.dtypes, [p.device for p in params])
    acc.fold = _folds(backend, flat.device)
    if block is None:
        block = likelihoods.score_columns(rows.detached, rows.labels, est.fim_type, o, est.seed,
                                          est.offset)
    root = block[0]  # Columns.root of one column
    eng.last_plan = (tmpl, calls)  # bound when read
    eng.add_taps = False  # one column: not streamed
    eng.columns = 1
    u = root if root.dtype == flat.dtype else root.to(flat.dtype)
    ccalls = [calls[k] for k in prog.calls]
    for c in ccalls:
        c.chunks = 1
    taps = [t for c in ccalls for t in c.taps]
    grads = vjp(flat, [t.handle for t in taps], u, False, False)
    if not onecol._complete(grads):  # the general chunk on the same gradients
        _head(prog, calls, root, acc, backend)
        onecol._general(eng.last_plan, taps, grads, acc, backend)
    else:

        def form() -> None:
            _head(prog, calls, root, acc, backend)
            _lanes(prog, calls, grads, acc, backend)

        kept = _entries(prog, calls, root, grads) if acc.fold else None
        if kept is not None and acc.keep(kept, form):
            return acc
        form()
    return acc if (acc.products or acc.rows) else acc.tensors()


def _head(prog: Program, calls: list, root: torch.Tensor, acc: Sums, backend) -> None:
    """The closed-form squares of the logits layer (:func:`fimfast.persample.squares.
    head_closed_form`) from the score column ``root``."""
    dtypes = acc.dtypes
    sq: dict = {}  # Columns.squares: root^2 per dtype, formed once

    def squared(dt):
        S = sq.get(dt)
        if S is None:
            S = sq[dt] = root.square() if root.dtype == dt else root.to(dt).square_()
        return S

    for index, k, side in prog.head:
        if k is None:
            acc.add(index, squared(dtypes[index]).sum(0))
            continue
        x = calls[k].data["x"]
        A = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if acc.fold and acc.defer(index, squared(dtypes[index]), A, None, side.transposed,
                                  squared=True):
            continue
        if not acc.defer(index, root, A, None, side.transposed):
            acc.add(index, squares._weight_sq(side, root, A, backend))


def _entries(prog: Program, calls: list, root: torch.Tensor, grads: list) -> tuple | None:
    """The arguments of the extension's ``fold_lanes`` after the values for the logits layer
    (``root``) and the lanes (``grads``) of ``prog``: ``(G, A, weight slots, bias slots,
    transposed)``; ``None`` where a lane fills a block of its parameter."""
    G, A, W, B, T = [], [], [], [], []
    for index, k, side in prog.head:
        x = None if k is None else calls[k].data["x"]
        G.append(root)
        A.append(x if x is None or x.dim() == 2 else x.reshape(-1, x.shape[-1]))
        W.append(-1 if k is None else index)
        B.append(index if k is None else -1)
        T.append(k is not None and side.transposed)
    for tap, wi, wblock, side, k, bi, bblock in prog.lanes:
        if wblock is not None or bblock is not None:
            return None
        G.append(grads[tap])
        A.append(None if wi is None else calls[k].data["x"])
        W.append(-1 if wi is None else wi)
        B.append(-1 if bi is None else bi)
        T.append(wi is not None and side.transposed)
    return G, A, W, B, T


def _lanes(prog: Program, calls: list, grads: list, acc: Sums, backend) -> None:
    """The lanes' squares (:func:`fimfast.persample.onecol.run`'s loop) from the gradients of
    the taps."""
    dtypes = acc.dtypes
    for tap, wi, wblock, side, k, bi, bblock in prog.lanes:
        G = grads[tap]
        G2 = dt2 = None
        if wi is not None:
            dt2 = dtypes[wi]
            x = calls[k].data["x"]
            if acc.fold:
                G2 = G.to(dt2).square()
                if acc.defer(wi, G2, x, wblock, side.transposed, squared=True):
                    x = None
            if x is not None and not acc.defer(wi, G, x, wblock, side.transposed):
                acc.add(wi, squares._weight_sq(side, G, x, backend), wblock)
        if bi is not None:
            dt = dtypes[bi]
            if G2 is None or dt != dt2:
                G2 = G.to(dt).square()
            acc.add(bi, G2.sum(0), bblock)
