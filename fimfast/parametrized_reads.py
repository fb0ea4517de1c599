"""Parametrized tensors that change with every computation, read several times in a forward.

The per-sample engine runs the forward under ``torch.nn.utils.parametrize.cached()``
(:func:`fimfast.derived_weights.computed`): each parametrized tensor is computed once, at its
first read, and every later read gets that tensor, so that the weight a rule lists is the one its
layer used. That is the model's own function as long as computing the tensor again would give the
same value. A parametrization that updates state when it is computed breaks this:
``parametrizations.spectral_norm`` in training mode runs a power iteration per computation
(writing its ``_u`` and ``_v`` buffers), so a forward reading the weight ``k`` times uses the
weight after ``k`` iterations, where the cached forward uses it after one; a dropout of the
weight (``F.dropout`` in a parametrization, as in a weight-dropped LSTM) draws ``k`` masks and
uses the last, and moves the random stream on ``k`` times. Such reads happen in a
module called twice, a weight read by the forward and again by ``F.linear``, and inside torch's
own ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (which read each weight several times per call), the
``nn.*Cell`` modules and ``nn.MultiheadAttention`` (whose rules rewrite the forward, so the reads
counted are the rule's, not torch's).

:func:`watched` counts the reads of each parametrized tensor during the cached forward (reads
inside a ``parametrize.cached()`` block of the model's own count once per tensor and block:
there the model computes it once per block too; a block entered other than through
``parametrize.cached`` counts as two) and raises :class:`fimfast.UnsupportedModelError` for a
tensor whose computation wrote a buffer or drew random numbers during the forward (hooks on its
``ParametrizationList``; one seen computed without such a change is taken as unchanging in that
training mode from then on) and that the model's own forward would have computed more than once.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from fimfast import guard

__all__ = ["watched"]

# torch's forward of these reads each of the module's weights several times per call, and the
# per-sample rules run a forward of their own
_SEVERAL = (torch.nn.RNNBase, torch.nn.RNNCellBase, torch.nn.MultiheadAttention)


class _Counting(dict):
    """``parametrize``'s cache, counting the reads of each key at the level of the estimator's
    own ``cached()`` (``base``): ``reads`` by the model's code, ``rule_reads`` by fimfast's (a
    rule listing the weight its layer used); ``inner``: key -> the ``cached()`` blocks of the
    model's forward it was read in (numbered by :meth:`block`; ``None``: a block entered another
    way than through ``parametrize.cached``, whose extent is unknown)."""

    def __init__(self, base: int) -> None:
        super().__init__()
        self.base = base
        self.reads: Counter = Counter()
        self.rule_reads: Counter = Counter()
        self.inner: dict = {}
        self.blocks: list[int] = [0]  # [blocks entered, the open outermost one's number...]

    def get(self, key, default=None):  # noqa: D102 - dict.get, counted
        if parametrize._cache_enabled > self.base:
            self.inner.setdefault(key, set()).add(self.blocks[-1] if len(self.blocks) > 1
                                                  else None)
        elif _by_fimfast():
            self.rule_reads[key] += 1
        else:
            self.reads[key] += 1
        return super().get(key, default)

    def computed(self, key) -> int:
        """How many times the model's own forward computes the tensor of ``key`` (2 where a
        block's extent is unknown: at least that may be)."""
        blocks = self.inner.get(key, set())
        return self.reads[key] + len(blocks) + (None in blocks)

    @contextmanager
    def block(self, cached) -> Iterator[None]:
        """``parametrize.cached`` during the forward: a block of the model's own, numbered
        where it is the outermost (torch's cache lives from its start to its end)."""
        outer = parametrize._cache_enabled == self.base
        if outer:
            self.blocks[0] += 1
            self.blocks.append(self.blocks[0])
        try:
            with cached():
                yield
        finally:
            if outer:
                self.blocks.pop()


_PARAMETRIZE = parametrize.__file__
_FIMFAST = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _by_fimfast() -> bool:
    """Whether the attribute read in progress is made by fimfast's code (the first frame out of
    ``_Counting.get`` and ``torch.nn.utils.parametrize``)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename == _PARAMETRIZE:
        f = f.f_back
    return f is not None and f.f_code.co_filename.startswith(_FIMFAST)


def _lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    """``(module name, module, tensor name, ParametrizationList)`` of the parametrizations of
    ``model`` (the walk of the modules made again when modules or buffers were registered since,
    :func:`fimfast.guard.registrations`)."""
    guard._watch_registrations()
    now = guard.registrations()
    found = _FOUND.get(model)
    if found is None or found[0] != now:
        found = _FOUND[model] = (now, [
            (qual, m, name, plist)
            for qual, m in model.named_modules() if parametrize.is_parametrized(m)
            for name, plist in m.parametrizations.items()])
    return found[1]


# model -> (registrations then, its parametrizations)
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(plist: torch.nn.Module) -> tuple:
    """What a computation of ``plist`` may change: its buffers' versions and the random streams
    (the CPU generator's, and the CUDA one of its device)."""
    versions = tuple(b._version for b in plist.buffers())
    streams = [torch.default_generator.get_state()]
    dev = next(iter(plist.parameters()), torch.empty(0)).device
    if dev.type == "cuda":
        streams.append(torch.cuda.get_rng_state(dev))
    return versions, streams


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _spectral(plist: torch.nn.Module) -> bool | None:
    """Whether ``plist`` (``spectral_norm`` alone) changes at each computation: in training mode
    with power iterations; ``None``: another parametrization, to be watched."""
    if len(plist) != 1 or not isinstance(plist[0], _SpectralNorm):
        return None
    return bool(plist[0].training and plist[0].n_power_iterations > 0)


# ParametrizationList -> the training modes in which a computation of it was seen to change
# nothing (weight_norm, orthogonal, spectral_norm in eval mode: not watched again in that mode)
_STILL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def _changing(lists: list) -> Iterator[set]:
    """Run the body with each ``ParametrizationList`` of ``lists`` hooked; yields the set of the
    ``(id(module), tensor name)`` whose computation wrote a buffer or drew from a random stream
    (``spectral_norm``'s power iteration in training mode, a dropout of the weight). One seen
    computed without a change is not hooked again in the same mode (:data:`_STILL`)."""
    changed: set = set()
    handles = []
    for _, m, name, plist in lists:
        key, before = (id(m), name), []

        def pre(mod, args, before=before):
            before.append(_state(mod))

        def post(mod, args, out, before=before, key=key):
            if before and not _same(before.pop(), _state(mod)):
                changed.add(key)
            elif key not in changed:
                _STILL.setdefault(mod, set()).add(mod.training)

        handles += [plist.register_forward_pre_hook(pre), plist.register_forward_hook(post)]
    try:
        yield changed
    finally:
        for h in handles:
            h.remove()


@contextmanager
def watched(model: torch.nn.Module) -> Iterator[None]:
    """Run the body (the forward, inside ``parametrize.cached()``) counting the reads of the
    parametrized tensors of ``model``; afterwards raise for one whose computation wrote a buffer
    or drew random numbers and that the model's own forward computes more than once (see the
    module docstring). Nothing is counted where the caller's ``cached()`` is not the outermost
    (the model's own forward then computes each tensor once as well)."""
    lists, known = [], set()
    for e in _lists(model) if parametrize._cache_enabled == 1 else []:
        how = _spectral(e[3])
        if how is None and e[3].training not in _STILL.get(e[3], ()):
            lists.append(e)  # watched in this forward
        elif how:
            lists.append(e)
            known.add((id(e[1]), e[2]))
    if not lists:
        yield
        return
    before, cached = parametrize._cache, parametrize.cached
    counting = _Counting(parametrize._cache_enabled)
    counting.update(before)
    parametrize._cache = counting
    parametrize.cached = lambda: counting.block(cached)
    try:
        with _changing([e for e in lists if (id(e[1]), e[2]) not in known]) as changed:
            yield
            changed |= known
    finally:
        parametrize.cached = cached
        if parametrize._cache is counting:
            parametrize._cache = before
            before.update(counting)
    for qual, m, name, _ in lists:
        key = (id(m), name)
        if key not in changed:
            continue  # computing it again gives the same tensor
        outside = counting.reads[key] + counting.rule_reads[key]
        if counting.computed(key) > 1 or (outside and isinstance(m, _SEVERAL)):
            raise _error(qual, m, name)


def _error(qual: str, m: torch.nn.Module, name: str) -> Exception:
    from fimfast.types import UnsupportedModelError

    where = f"{qual}.{name}" if qual else name
    kind = parametrize.type_before_parametrizations(m).__name__
    how = (f"torch's {kind} forward reads it several times per call"
           if isinstance(m, _SEVERAL) else "the forward reads it more than once")
    return UnsupportedModelError(
        f"the parametrized tensor {where} changes each time it is computed (its "
        "parametrization writes its buffers or draws random numbers: spectral_norm in training "
        "mode runs a power iteration per computation, a dropout of the weight draws a mask) and "
        f"{how}; the per-sample types (EXACT, EMPIRICAL, "
        "MONTE_CARLO) compute it once per forward (torch.nn.utils.parametrize.cached), so "
        "they would estimate the Fisher of another weight. Put the module in eval mode, wrap "
        "the model's forward in torch.nn.utils.parametrize.cached() (it then computes the "
        "weight once too), or use a HUTCHINSON type; nothing was added to the estimate"
    )
