"""The walks of a model kept from step to step by the step guards (:mod:`fimfast.guard`): the
count of module and buffer registrations in the process, and :class:`ModuleWalk`, the model's
modules and its lookups with ``max_norm``."""

from __future__ import annotations

import torch

__all__ = ["ModuleWalk", "registrations"]

_LOOKUPS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def registrations() -> int:
    """How many modules and buffers were registered in this process (on any module) since the
    first guard was made: torch's global registration hooks count them. The walks of a model's
    modules and buffers kept from step to step are made again when it moved (a module or a
    buffer added to the model after a step: a BatchNorm put in, a module with a backward hook)."""
    return _REGISTRATIONS[0]


def _registered(*_args) -> None:
    _REGISTRATIONS[0] += 1  # (None: the registration goes on unchanged)


def _buffer_registered(module: torch.nn.Module, name: str, _tensor) -> None:
    # a new buffer only: a forward that assigns a buffer of its own again (spectral_norm's power
    # iteration in train mode) registers it at every step, and BufferGuard reads the buffers
    # by name at every step
    if name not in module._buffers:
        _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    if not _REGISTRATIONS:
        _REGISTRATIONS.append(0)
        torch.nn.modules.module.register_module_module_registration_hook(_registered)
        torch.nn.modules.module.register_module_buffer_registration_hook(_buffer_registered)


_REGISTRATIONS: list[int] = []


class ModuleWalk:
    """``model.modules()`` as a list, walked again only when the model, its set of trainable
    parameters (or the list of them: :class:`fimfast.parameters.ParamWalk` makes a new one when
    a module is added or removed) or :func:`registrations` changes, and its lookups with
    ``max_norm`` (for :func:`fimfast.guard.parameters_kept` and
    :func:`fimfast.guard.gradient_hooks_off`), read at every call: ``max_norm`` set on a
    lookup after a step makes its forward renormalise the rows it reads in place, which the
    step's guard then puts back (a list kept from the first step refused the write and left the
    table renormalised)."""

    def __init__(self) -> None:
        _watch_registrations()
        self._key: tuple | None = None
        self._walk: tuple[list, list] = ([], [])
        self._seen: tuple = (None, None, -1)  # (model, params list, registrations) of the last
        self._lookups: list | None = None  # the lookups of _walk[0] (None: not found yet)

    def of(self, model: torch.nn.Module, params: list[torch.Tensor]) -> tuple[list, list]:
        """``(modules, lookups with max_norm)`` of ``model``. The list ``params`` of the last call
        (an estimator's :class:`fimfast.parameters.ParamWalk` returns the same list while the
        model's parameters hold) is recognised without reading it."""
        seen_model, seen_params, seen_regs = self._seen
        regs = _REGISTRATIONS[0]
        if params is not seen_params or model is not seen_model or regs != seen_regs:
            key = (id(model), tuple(map(id, params)), regs)
            # another list from the estimator's ParamWalk: a module put in or taken out without
            # a registration (nn.Sequential.insert writes _modules), whose hooks must be seen
            if key != self._key or seen_params is not None:
                self._key, self._walk, self._lookups = key, (list(model.modules()), []), None
            self._seen = (model, params, regs)
        lookups = self._lookups
        if lookups is None:
            lookups = self._lookups = [m for m in self._walk[0] if isinstance(m, _LOOKUPS)]
        if lookups:
            tables = [m for m in lookups if m.max_norm is not None]
            if tables != self._walk[1]:
                self._walk = (self._walk[0], tables)
        return self._walk
