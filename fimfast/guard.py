"""A Fisher step leaves the model's buffers (and parameters, :func:`parameters_kept`) as it
found them.

A forward in train mode updates buffers: BatchNorm's ``running_mean``, ``running_var`` and
``num_batches_tracked``, and whatever a custom module writes in place. A Fisher step is a
measurement, so :class:`BufferGuard` puts every buffer the step changed back afterwards, also when
the step raises. The first step of a model copies all its buffers (the guard does not know yet
which ones a forward writes); later steps copy only those seen written before plus the running
statistics of norm layers in train mode (compared by value: native kernels such as batch_norm
write without bumping the version counter), and check the version counters of the others. A
buffer written for the first time in a later step cannot be put back (there is no copy): the guard
warns, naming it, and restores it from then on. ``DiagFisher.train_step`` is a training step and
keeps the updates.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from operator import attrgetter

import torch
from torch.nn.modules.batchnorm import _NormBase

from fimfast.module_walk import (  # noqa: F401 - guard.ModuleWalk, guard.registrations
    _REGISTRATIONS,
    ModuleWalk,
    _watch_registrations,
    registrations,
)


class BufferGuard:
    """Restores the buffers of one model after each guarded step (see the module docstring)."""

    def __init__(self) -> None:
        _watch_registrations()
        self._key: tuple[int, int] | None = None  # the model's id, registrations()
        self._buffers: list[tuple[torch.nn.Module, str, str]] = []
        self._norm: list[bool] = []  # per buffer: whether its module is a norm (_NormBase)
        self._written: set[str] = set()  # qualified names of buffers a forward wrote
        self._first = True
        self._mods: list | None = None  # the module walk the last follow() was given

    def follow(self, mods: list) -> None:
        """Scan again at the next use where ``mods``, the guards' walk of the model's modules
        (:class:`ModuleWalk`), was made again since the last call: a module put in without a
        registration (``nn.Sequential.insert``, a BatchNorm) has buffers to keep."""
        if mods is not self._mods:
            if self._mods is not None:  # (the first walk: what the scan or adopt() found)
                self._key = None
            self._mods = mods

    def has_buffers(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` has buffers for :meth:`kept` to guard."""
        self._scan(model)
        return bool(self._buffers)

    def _scan(self, model: torch.nn.Module) -> None:
        if self._key != (id(model), _REGISTRATIONS[0]):  # another model, or registrations since
            self.adopt(model, [(m, name, f"{prefix}.{name}" if prefix else name)
                               for prefix, m in model.named_modules()
                               for name, b in m.named_buffers(recurse=False) if b is not None])

    def adopt(self, model: torch.nn.Module, buffers: list) -> None:
        """Take ``buffers``, ``[(module, name, qualified name)]``, as the scan of ``model`` (what
        :meth:`_scan` finds; a cached structure's list): a first step follows."""
        self._key = (id(model), _REGISTRATIONS[0])
        self._buffers = buffers
        self._norm = [isinstance(m, _NormBase) for m, _, _ in buffers]
        self._written = set()
        self._first = True

    @contextmanager
    def kept(self, model: torch.nn.Module) -> Iterator[None]:
        """Run the body; afterwards every buffer of ``model`` holds its value from before."""
        self._scan(model)
        if not self._buffers:  # nothing to put back (an MLP, a model of Linear layers)
            yield
            return
        saved = self._save()
        try:
            yield
        finally:
            self._restore(saved)

    def _save(self) -> list:
        """What :meth:`_restore` needs of the buffers of the model last scanned (copies of those
        a forward may write)."""
        first, written = self._first, self._written
        return [(m, name, qual, b, b._version,
                 b.detach().clone() if first or (norm and m.training) or qual in written else None)
                for (m, name, qual), norm in zip(self._buffers, self._norm)
                if (b := m._buffers.get(name)) is not None]

    def _restore(self, saved: list) -> None:
        self._first = False
        if all(c is None and m._buffers.get(n) is b and b._version == v
               for m, n, _, b, v, c in saved):
            return  # every buffer as it was, none copied (the usual eval-mode step)
        lost = []
        with torch.no_grad():
            for m, name, qual, b, version, copy in saved:
                now = m._buffers.get(name)
                if now is not b:  # replaced by a new tensor: the old one is the value from before
                    m._buffers[name] = b
                    if b._version == version:
                        self._written.add(qual)
                        continue
                if copy is not None:
                    # native kernels (batch_norm's running statistics) write without bumping the
                    # version counter: compare the values
                    if b._version != version or not torch.equal(b, copy):
                        self._written.add(qual)
                        b.copy_(copy)
                elif b._version != version:
                    self._written.add(qual)
                    lost.append(qual)
        if lost:
            warnings.warn(
                f"fimfast: the forward wrote buffer(s) {', '.join(lost)} in place for the first "
                "time in this step; they keep the step's values (later steps put them back)",
                RuntimeWarning,
                stacklevel=4,
            )


@contextmanager
def parameters_kept(
    tables: list[torch.nn.Module], names: list[str], params: list[torch.Tensor]
) -> Iterator[None]:
    """Run the body (one Fisher step); afterwards the parameters hold their values from before.

    A lookup with ``max_norm`` (``nn.Embedding``, ``nn.EmbeddingBag``) renormalises the rows it
    reads in place, under ``no_grad``, before reading them: the rows each call is about to read
    are copied by a forward pre-hook and written back after the body (last call first), so the
    step measures the renormalised model, as the next training forward computes it, and leaves
    the table as it was. Any other in-place write into a trainable parameter (``F.embedding`` with
    ``max_norm`` on a bare parameter, a forward that updates its own weights) cannot be undone
    without a copy of every parameter: it is refused after the body, naming the parameter.

    ``tables``: the model's ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``max_norm``
    (:class:`ModuleWalk`).

    Raises:
        UnsupportedModelError: the body wrote into a trainable parameter in place.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def keep_rows(module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).unique().to(module.weight.device)
            saved.append((module.weight, ids, module.weight.detach()[ids].clone()))

    handles = [m.register_forward_pre_hook(keep_rows, with_kwargs=True) for m in tables]
    restored = {id(m.weight) for m in tables}
    versions = list(map(_VERSION, params))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for w, ids, rows in reversed(saved):
                w.index_copy_(0, ids, rows)
    _refuse_written(names, params, versions, restored)


def _refuse_written(
    names: list[str], params: list[torch.Tensor], versions: list[int], restored
) -> None:
    """Raise for the parameters written in place since ``versions`` were read, but those of
    ``restored`` (by ``id``; rows put back by :func:`parameters_kept`)."""
    written = [n for n, p, v in zip(names, params, versions)
               if p._version != v and id(p) not in restored]
    if written:
        from fimfast.types import UnsupportedModelError

        raise UnsupportedModelError(
            f"the model's forward wrote into trainable parameter(s) {', '.join(written[:5])} in "
            "place (F.embedding with max_norm on a bare parameter, or a forward that updates its "
            "own weights); a Fisher step must leave the parameters as they are and cannot put "
            "them back: they keep the forward's values and nothing was added to the estimate. "
            "Use nn.Embedding(max_norm=...) (whose rows a step puts back), or renormalise "
            "outside the forward"
        )


@contextmanager
def gradient_hooks_off(
    modules: list[torch.nn.Module], params: list[torch.Tensor]
) -> Iterator[None]:
    """Run the body (one Fisher step) with the gradient hooks of the trainable parameters
    (``Tensor.register_hook``) and the backward hooks of the modules
    (``register_full_backward_hook``, ``register_full_backward_pre_hook``,
    ``register_backward_hook``, and the global ones of ``torch.nn.modules.module``) switched off,
    and put them back afterwards.

    Such hooks change the gradients autograd reports (clipping, scaling, reversal), not the
    model's function, whose Fisher a step estimates: the layer rules of the per-sample engine
    never see them, while a backward to the parameters (the generic path, the HUTCHINSON family)
    would. Each hook dictionary is emptied in place (autograd holds the dictionary itself) and
    refilled after the body, so the handles that remove the hooks keep working. ``modules``: the
    model's modules (:class:`ModuleWalk`).
    """
    saved = _hooks_off(modules, params)
    try:
        yield
    finally:
        _hooks_back(saved)


def _hooks_off(modules: list[torch.nn.Module], params: list[torch.Tensor]) -> list[tuple]:
    """Empty every non-empty gradient-hook dictionary of :func:`gradient_hooks_off` in place;
    returns ``(dictionary, its items)`` for :func:`_hooks_back`."""
    mod = torch.nn.modules.module  # register_module_full_backward_hook / _pre_hook: every module
    if not (  # none at all (the usual step): told by loops in C, no Python frame per object
        any(map(_BACKWARD_HOOKS, params)) or any(map(_BACKWARD_HOOKS, modules))
        or any(map(_MODULE_PRE_HOOKS, modules)) or mod._global_backward_hooks
        or mod._global_backward_pre_hooks
    ):
        return []
    saved = []
    for p in params:
        d = p._backward_hooks
        if d:
            saved.append((d, dict(d)))
    for m in modules:
        if m._backward_hooks:
            saved.append((m._backward_hooks, dict(m._backward_hooks)))
        if m._backward_pre_hooks:
            saved.append((m._backward_pre_hooks, dict(m._backward_pre_hooks)))
    for d in (mod._global_backward_hooks, mod._global_backward_pre_hooks):
        if d:
            saved.append((d, dict(d)))
    for d, _ in saved:
        d.clear()
    return saved


_BACKWARD_HOOKS = attrgetter("_backward_hooks")  # a tensor's, or a module's
_MODULE_PRE_HOOKS = attrgetter("_backward_pre_hooks")
_VERSION = attrgetter("_version")


def _hooks_back(saved: list[tuple]) -> None:
    """Refill the dictionaries :func:`_hooks_off` emptied."""
    for d, items in saved:
        d.update(items)


@contextmanager
def retained_graphs() -> Iterator[None]:
    """Back-propagate a graph more than once inside the body, through ``torch.compile`` regions
    too.

    fimfast back-propagates the graph of the logits once per chunk of columns (and once more in
    ``train_step``) with ``retain_graph=True``. An ``aot_autograd`` backward (``torch.compile``
    with ``aot_eager`` or ``inductor``) compiled with *donated buffers* (the default, used when a
    recompilation for a new batch size saves tensors only its backward needs) refuses a retained
    backward while ``torch._functorch.config.donated_buffer`` is set, although it compiles a
    backward that keeps its saved tensors for one (``saved_tensors_use_once=False``). The body runs
    with the option off, and it is restored afterwards.
    """
    cfg = getattr(getattr(torch, "_functorch", None), "config", None)
    if cfg is None or not getattr(cfg, "donated_buffer", False):
        yield
        return
    cfg.donated_buffer = False
    try:
        yield
    finally:
        cfg.donated_buffer = True


def step_kept(
    buffers: BufferGuard, walk: ModuleWalk, model: torch.nn.Module, names: list[str],
    params: list[torch.Tensor],
) -> contextlib.AbstractContextManager[None]:
    """The guards of one Fisher step, a context manager: buffers (:meth:`BufferGuard.kept`),
    parameters (:func:`parameters_kept`), gradient hooks (:func:`gradient_hooks_off`) and the
    lookups' ``scale_grad_by_freq`` (:func:`unscaled`), ``walk`` giving the model's modules and
    ``max_norm`` lookups."""
    mods, tables = walk.of(model, params)
    buffers.follow(mods)
    if tables:
        return _all_kept(buffers, model, tables, names, params, mods)
    return StepKept(names, params, mods, buffers if buffers.has_buffers(model) else None)


@contextmanager
def _all_kept(
    buffers: BufferGuard, model: torch.nn.Module, tables: list, names: list[str],
    params: list[torch.Tensor], mods: list,
) -> Iterator[None]:
    with (
        buffers.kept(model),
        parameters_kept(tables, names, params),
        gradient_hooks_off(mods, params),
    ):
        scaled = unscaled(mods)
        try:
            yield
        finally:
            rescaled(scaled)


_LOOKUPS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def unscaled(mods: list) -> list:
    """Switch off ``scale_grad_by_freq`` of the lookups among ``mods`` (returned, for
    :func:`rescaled`): it divides autograd's gradient of the table by each token's count in the
    whole batch, a training heuristic that leaves the forward unchanged, so a Fisher step took
    per-sample gradients that depended on the other samples (the derivative of the lookup is
    not divided)."""
    on = [m for m in mods if isinstance(m, _LOOKUPS) and m.scale_grad_by_freq]
    for m in on:
        m.scale_grad_by_freq = False
    return on


def rescaled(on: list) -> None:
    """Put back the ``scale_grad_by_freq`` that :func:`unscaled` switched off."""
    for m in on:
        m.scale_grad_by_freq = True


class StepKept:
    """The guards of :func:`step_kept` for a model without ``max_norm`` lookups (an MLP, most
    classifiers): the gradient hooks and the lookups' ``scale_grad_by_freq`` are switched off
    (if any) and the parameters' version counters read, in one object (no generator); with
    ``buffers`` (the model's :class:`BufferGuard`, scanned) its buffers are kept and put back
    too, as :func:`_all_kept` does (the same guards in the same order, without its three
    generators: 85 -> 26-54 us a step on a model of 24 buffers)."""

    __slots__ = ("names", "params", "mods", "versions", "saved", "scaled", "buffers", "kept")

    def __init__(self, names: list[str], params: list[torch.Tensor], mods: list,
                 buffers: BufferGuard | None = None) -> None:
        self.names, self.params, self.mods, self.buffers = names, params, mods, buffers

    def __enter__(self) -> None:
        if self.buffers is not None:
            self.kept = self.buffers._save()
        self.versions = list(map(_VERSION, self.params))
        self.saved = _hooks_off(self.mods, self.params)
        self.scaled = unscaled(self.mods)

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if self.scaled:
                rescaled(self.scaled)
            if self.saved:
                _hooks_back(self.saved)
            if exc_type is None and list(map(_VERSION, self.params)) != self.versions:
                _refuse_written(self.names, self.params, self.versions, ())
        finally:
            if self.buffers is not None:
                self.buffers._restore(self.kept)


def donating() -> bool:
    """Whether a retained backward needs :func:`retained_graphs` now: ``torch.compile``'s
    configuration is loaded and donates buffers."""
    cfg = sys.modules.get("torch._functorch.config")
    return cfg is not None and bool(getattr(cfg, "donated_buffer", False))


def arithmetic(
    logits: torch.Tensor, retained: bool = True
) -> contextlib.AbstractContextManager[None]:
    """fimfast's own arithmetic (probes, eigenpairs, squares, backward) on the device of
    ``logits``, with autocast disabled.

    The forward keeps the caller's autocast; a bf16 autocast region around a step would otherwise
    run the eigenvector mix and the per-sample squared products in bf16. With ``retained``,
    retained backwards through compiled regions are allowed (:func:`retained_graphs`) where
    ``torch.compile`` donates buffers (:func:`donating`). Without autocast and with nothing to
    allow, nothing is set up (the usual step).
    """
    # the device's type without a torch.device object for CPU tensors (a step makes it cold)
    kind = "cpu" if logits.is_cpu else logits.device.type
    autocast = torch.is_autocast_enabled(kind)
    if not autocast and (not retained or not donating()):
        return _NOTHING
    return _arithmetic(kind, retained, autocast)


@contextmanager
def _arithmetic(kind: str, retained: bool, autocast: bool) -> Iterator[None]:
    with retained_graphs() if retained else _NOTHING:
        if not autocast:  # nothing to turn off (the usual case)
            yield
            return
        with torch.autocast(kind, enabled=False):
            yield


_NOTHING = contextlib.nullcontext()  # a context manager doing nothing (reusable, reentrant)
