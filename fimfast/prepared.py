"""The prepared HUTCHINSON step: a one-probe step of a plain model, run straight through.

:meth:`fimfast.DiagFisher.step` goes through general layers: the batch (:mod:`fimfast.batch`),
the forward (:class:`fimfast.forward.Forward`), the rows, the estimate path (:mod:`fimfast.step`,
:mod:`fimfast.hutchinson`) and the state (:mod:`fimfast.state`). Each of them decides again, at
every step, what the estimator's configuration and the model's structure already told, and every
decision reads Python objects that the model's forward and backward have evicted from the caches
(docs/architecture.md, "Fixed cost of a step").

:func:`step` runs the step of one configuration in one function: a type of the HUTCHINSON family
drawn with one probe in the softmax's own form (HUTCHINSON, HUTCHINSON_DG), the categorical
likelihood, no ``lm_head``, ``forward_fn`` or ``shift_labels=True``, a model that is not a
``DistributedDataParallel`` wrapper and has no ``max_norm`` lookups and no sparse lookup tables
(a model with buffers, BatchNorm's running statistics or rotary tables, runs under the general
path's guard, :func:`fimfast.guard.step_kept`, which puts them back); batches ``(inputs,
labels)`` whose inputs are a tensor. Whether the configuration
is one of those is decided once (:class:`Prepared`, kept while the options and the parameter list
of :class:`fimfast.parameters.ParamWalk` stay the same objects). Every check of the general path
still runs, through the same functions: the parameter walk, the gradient hooks and the version
counters of the parameters (:class:`fimfast.guard.StepKept`), the no-grad watch, the row checks
and the reentrant-checkpoint walk. On CPU logits whose probe the ``cpp`` backend draws, the row
checks, the probe and the walk are one call of the extension (csrc/one_probe_step.cpp: the
probe's kernel without the dispatcher, no ``detach`` nor ``select`` around it), and the
squares of the gradients are added to the state by the extension's loop (csrc/cpu/fold_squares.cpp,
bit for bit torch's multi-tensor ``addcmul``, with less overhead). When the batch, the output
or a check asks for more (a tuple output, labels out of range, NaN logits, autocast, more rows
than one probe chunk, a state still at zero, an unused parameter), the general code takes over
at the point reached: results and errors are those of the general path, bit for bit
(tests/test_prepared_step.py).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from fimfast import _ext, distributed, guard, hutchinson, ops
from fimfast.finite import rows_all_valid
from fimfast.forward import CALL_ERRORS, call_failed
from fimfast.likelihoods import counters_used
from fimfast.nograd import nograd_error
from fimfast.ops.registry import bound
from fimfast.ops.rng import as_int64
from fimfast.types import FIMType

if TYPE_CHECKING:
    from fimfast.estimator import DiagFisher

__all__ = ["Prepared", "step"]

# the types whose one-probe cotangent is the fused probe itself (HUTCHINSON_SQRT back-propagates
# it through log_softmax first; the rank-k types need eigenpairs)
_MODES = {FIMType.HUTCHINSON: "hutchinson", FIMType.HUTCHINSON_DG: "dg"}
_TENSOR = torch.Tensor
_PAIRS = (tuple, list)
_DTENSOR = "torch.distributed.tensor"  # the module of FSDP2's parameters


class Prepared:
    """What the steps of one estimator configuration share, decided once.

    Attributes:
        opts: the options it was decided for (the estimator's :class:`fimfast.types.Options`).
        params: the parameter list it was decided for (by identity).
        mode: the probe mode of :func:`fimfast.ops.probe_logit_grad`, or ``None`` when the
            configuration takes the general path.
        mods: the model's modules (:class:`fimfast.guard.ModuleWalk`).
        regs: :func:`fimfast.guard.registrations` when it was decided (a module or buffer
            registered since, a BatchNorm put in say, decides again).
    """

    __slots__ = ("opts", "params", "mode", "mods", "regs", "buffers")

    def __init__(self, est: DiagFisher, params: list[torch.Tensor]) -> None:
        self.opts, self.params, self.mode = est.opts, params, None
        self.regs = guard.registrations()
        o, model = est.opts, est.model
        self.mods, tables = est._modules.of(model, params)
        if (
            est.fim_type in _MODES
            and o.num_probes == 1
            and o.likelihood == "categorical"
            and o.forward_fn is None
            and o.lm_head is None
            and o.shift_labels is not True
            and o.class_dim in (None, -1, 1)
            and not tables
            and not distributed.is_ddp(model)
            and not est._sparse_tables(params)
        ):
            self.mode = _MODES[est.fim_type]
        # buffers (BatchNorm's running statistics, rotary tables): the general path's guard,
        # which puts them back after the step (guard.step_kept)
        est._guard.follow(self.mods)
        self.buffers = est._guard.has_buffers(model)


def step(est: DiagFisher, batch: Any) -> bool:
    """``est.step(batch)`` for a prepared configuration (see the module docstring); ``False``,
    with nothing done, when the general path runs the step."""
    if (
        type(batch) not in _PAIRS or len(batch) != 2 or type(batch[0]) is not _TENSOR
        or est._head is not None
    ):
        return False
    names, params = est._walk.of(est.model)
    prep = est._prepared
    if (prep is None or prep.params is not params or prep.opts is not est.opts
            or prep.regs != guard.registrations()):
        prep = est._prepared = Prepared(est, params)
    checked = est._checked  # else _params checks the parameters against the state first
    if prep.mode is None or names is not checked[0] or est.state is not checked[1]:
        return False
    if est._modules.of(est.model, params)[1]:  # max_norm set on a lookup since: its guard
        return False
    x, labels = batch
    model, o, rows, one, grads = est.model, est.opts, None, None, None
    kept = (guard.step_kept(est._guard, est._modules, model, names, params) if prep.buffers
            else guard.StepKept(names, params, prep.mods))
    with kept:
        with est._nograd.watching(model, params, lean=True) as seen:
            try:
                z = model(x)
            except CALL_ERRORS as exc:
                raise call_failed(exc, x, None) from exc
            # (a detached z takes rows_of, which refuses it)
            if type(z) is _TENSOR and z.dim() == 2 and z.requires_grad and _whole(z):
                # the row checks, the probe and the reentrant-checkpoint walk in one call
                one = _one_probe(est, prep, z, labels)
            if one is None and not (
                type(z) is _TENSOR and z.dim() == 2 and z.requires_grad
                and rows_all_valid(z, labels, o.ignore_index)
            ):
                rows = est._forward_of(batch).rows_of(z, labels, None)
                z = rows.logits
        if seen and not (one[1] if one else hutchinson.has_reentrant_checkpoint(z)):
            raise nograd_error(seen, "")
        if _DTENSOR in sys.modules:  # else no forward swaps the parameters (FSDP2 only)
            params = est._params_after_forward(params)
        if rows is None and params is prep.params and (one is not None or _whole(z)):
            if one is not None:
                u, reentrant = one
            else:
                u = ops.probe_logit_grad(
                    z.detach(), prep.mode, est.seed, est.offset, 1, backend=o.backend
                )[0]
                reentrant = hutchinson.has_reentrant_checkpoint(z)
            if u.dtype != z.dtype:
                u = u.to(z.dtype)
            grads = hutchinson.vjp(z, params, u, False, reentrant)
        else:  # the general estimate of these rows
            if rows is None:
                rows = est._forward_of(batch).rows_of(z, labels, None)
            with guard.arithmetic(z, retained=False):
                acc = est._estimate(rows, params, retain_graph=False)
    if grads is None:
        est._commit(acc, rows)
        return True
    R, C = z.shape
    state = est.state
    # the extension's fold where its probe ran (the cpp backend bound, the extension loaded)
    if not state.add_squares(grads, R, _HOST[2] if one is not None else None):
        state.commit(hutchinson.squares(grads, u, state.dtypes, o.backend), R, owned=True)
    est._reset = est._restarted = False
    est.offset += counters_used(1, R, C)
    return True


def _whole(z: torch.Tensor) -> bool:
    """Whether the probe of the ``(R, C)`` logits ``z`` is one chunk of probe rows
    (:func:`fimfast.hutchinson.rows_per_chunk`) and no autocast is to be turned off for it
    (:func:`fimfast.guard.arithmetic`): the estimate :func:`step` makes itself."""
    R, C = z.shape
    return (R == 1 or R * C <= hutchinson._CHUNK_ELEMS) and not torch.is_autocast_enabled(
        "cpu" if z.is_cpu else z.device.type
    )


def _one_probe(est: DiagFisher, prep: Prepared, z: torch.Tensor, labels: Any):
    """The extension's one call for CPU logits whose probe the ``cpp`` backend draws
    (csrc/one_probe_step.cpp): ``None`` unless the rows are all valid, else ``(probe,
    reentrant)``; ``None`` also without the extension or on another backend."""
    if not z.is_cpu or type(labels) is not _TENSOR:
        return None
    host = _HOST or _host()
    if host[0] is None or bound("probe_logit_grad", est.opts.backend, _CPU) is not host[1]:
        return None
    return host[0](z, labels, est.opts.ignore_index, prep.mode, as_int64(est.seed),
                   as_int64(est.offset))


def _host() -> list:
    """``[one_probe_step of the extension, the cpp backend's probe_logit_grad, fold_squares of
    the extension]`` (``None`` for what is missing; the first two both or neither), looked up
    once and kept in :data:`_HOST`."""
    fn = _ext.host_function("one_probe_step")
    try:
        from fimfast.ops.cpp import probe_logit_grad_cpp
    except ImportError:
        fn = probe_logit_grad_cpp = None
    _HOST[:] = [fn, probe_logit_grad_cpp, _ext.host_function("fold_squares")]
    return _HOST


_HOST: list = []
_CPU = torch.device("cpu")
