"""The trainable parameters of a model, as every step reads them.

:func:`trainable_parameters` is the parameter set an estimator is made for and checks at every
step (:meth:`fimfast.state.State.check_params`): ``model.named_parameters()`` restricted to
``requires_grad``, walked without its generator layers.
"""

from __future__ import annotations

import torch

from fimfast import _ext
from fimfast.types import UnsupportedModelError

__all__ = ["ParamWalk", "check_real", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters with ``requires_grad`` (tied weights once), in
    ``model.named_parameters()`` order."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    names: list[str] = []
    params: list[torch.Tensor] = []
    _collect(model, "", set(), set(), names, params)
    _require(names)
    return names, params


def _require(names: list[str]) -> None:
    if not names:
        raise ValueError("model has no trainable parameters (requires_grad=True)")


def _collect(
    module: torch.nn.Module, prefix: str, modules: set, seen: set, names: list, params: list,
    record: tuple[list, list] | None = None,
) -> None:
    """``named_parameters()`` without its generator layers: modules in pre-order, each once, then
    each of its parameters not met before. ``record``: ``(tables, met)`` lists that receive what
    :class:`ParamWalk` checks (each dictionary read, each parameter met)."""
    modules.add(id(module))
    if record is not None:
        d = module.__dict__
        for attr in ("_parameters", "_modules"):
            t = d[attr]
            record[0].append((d, attr, t, tuple(t.keys()), tuple(t.values())))  # a ScriptModule's
            # tables are wrappers without __iter__
    for k, p in module._parameters.items():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            if record is not None:
                record[1].append(p)
            if p.requires_grad:
                names.append(prefix + k)
                params.append(p)
    for k, child in module._modules.items():
        if child is not None and id(child) not in modules:
            _collect(child, prefix + k + ".", modules, seen, names, params, record)


class ParamWalk:
    """:func:`trainable_parameters` of one model, walked again only when its structure changed.

    A walk keeps what it read: every module's dictionaries of parameters and of children (the
    dictionary, its keys and its values, by identity), the ``requires_grad`` of every parameter
    met, trainable or not, and the sizes of the trainable ones. A later call checks those in one
    call of the compiled extension (csrc/param_walk.cpp: no walk, no name strings made) and
    returns the same lists when nothing changed; a parameter or module added, removed, replaced
    or renamed, a dictionary replaced, a parameter frozen, unfrozen or resized, or another model
    makes it walk again and return new lists. Without the extension every call walks (new lists).
    Dtypes and devices are not part of the set: ``model.to()`` keeps the parameter objects, as the
    lists do.
    """

    def __init__(self) -> None:
        self._model: torch.nn.Module | None = None
        self._read: tuple = ()  # the arguments of the extension's check (see _walk)
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []

    def of(self, model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
        """``trainable_parameters(model)``: the lists of the last walk while they still hold."""
        holds = _HOLDS[0] if _HOLDS else _holds()
        if holds is None:
            return trainable_parameters(model)
        if model is not self._model or not holds(*self._read):
            self._walk(model)
        return self.names, self.params

    def _walk(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self._model = None  # until the walk succeeds
        names: list[str] = []
        params: list[torch.Tensor] = []
        met: list[torch.Tensor] = []
        tables: list[tuple] = []
        _collect(model, "", set(), set(), names, params, (tables, met))
        _require(names)
        grads = tuple(p.requires_grad for p in met)
        shapes = tuple(tuple(p.shape) for p in params)
        self._read = (tables, tuple(met), grads, tuple(params), shapes)
        self.names, self.params, self._model = names, params, model


def _holds():
    """The extension's check of a walk, or ``None`` (looked up once, kept in :data:`_HOLDS`)."""
    _HOLDS.append(_ext.host_function("walk_holds"))
    return _HOLDS[0]


_HOLDS: list = []


def check_real(names: list[str], params: list[torch.Tensor]) -> None:
    """Refuse complex trainable parameters: the Fisher estimated is that of real parameters."""
    if bad := [n for n, p in zip(names, params) if p.is_complex()]:
        raise UnsupportedModelError(
            f"trainable parameter(s) {', '.join(bad[:5])} are complex: fimfast estimates the "
            "Fisher of real parameters. Keep real and imaginary parts in a real parameter of shape "
            "(..., 2), complex in the forward (torch.view_as_complex), or set requires_grad=False")
