"""The no-grad watch of the estimators without a layer capture (the HUTCHINSON family).

A module owning trainable parameters that the forward runs with gradients disabled
(``torch.no_grad``, a reentrant ``torch.utils.checkpoint`` segment) is invisible to autograd: its
parameters' Fisher would read as 0. :class:`NogradWatch` records such modules during the forward
(the estimator refuses the step, or allows it for a reentrant checkpoint, which HUTCHINSON's plain
backward reaches; :func:`nograd_error`). The per-sample engine's layer capture
(:class:`fimfast.hooks.Capture`) uses the same watch for the modules whose rule hook does not note
such calls itself (:meth:`fimfast.rules.Rule.install`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules import module as _module_mod

from fimfast import lean_mha
from fimfast.hooks import owners

__all__ = ["NogradWatch"]


class NogradWatch:
    """Records the modules owning trainable parameters that a forward runs with gradients
    disabled (see the module docstring).

    Only those modules are watched: for the duration of the forward each gets an instance
    ``forward`` that notes the call when ``torch.is_grad_enabled()`` is false and calls the
    module's own ``forward``. Every other module keeps torch's hook-free call path (a global
    forward pre-hook sends every module call of the forward through the hooked path). The
    wrappers are made once per parameter set and put back exactly as found (an instance
    ``forward`` of the user's included). A model holding a compiled or scripted module is watched
    by a global pre-hook instead (an instance ``forward`` would be a guard of compiled code).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._owned: dict[int, str] = {}
        self._wrap: list[tuple] | None = None  # (module, wrapper, cell of what it replaced)
        self._handle: Any = None
        self.seen: list[str] = []
        self.lean = False  # the watched nn.MultiheadAttention by fimfast.lean_mha (this entry)

    def _note(self, name: str) -> None:
        if name not in self.seen:
            self.seen.append(name)

    def watching(
        self,
        model: torch.nn.Module,
        params: list[torch.Tensor],
        skip: frozenset = frozenset(),
        lean: bool = False,
    ) -> NogradWatch:
        """The watch of ``model`` for one forward: ``with watch.watching(model, params) as
        seen:`` runs the body with the watch installed; ``seen`` is the list the names of such
        modules are appended to. The modules of ``skip`` (by ``id``) are left unwrapped: their
        calls without gradients are appended to ``seen`` by the caller (a rule's forward hook).
        With ``lean``, a watched ``nn.MultiheadAttention`` without an instance ``forward`` of
        its own runs :func:`fimfast.lean_mha.forward` (torch's forward where that does not
        apply)."""
        self.lean = lean
        key = (id(model), skip, *map(id, params))
        if key != self._key:
            self._key, self._owned = key, owners(model, params)
            self._wrap = None if _compiled(model) else [
                (m, *self._wrapper(m, name))
                for m in model.modules()
                if (name := self._owned.get(id(m))) is not None and id(m) not in skip
            ]
        return self

    def __enter__(self) -> list[str]:
        self.seen = []
        if self._wrap is None:
            pre = _nograd_hook(self._owned, self.seen)
            self._handle = _module_mod.register_module_forward_pre_hook(pre)
            return self.seen
        try:
            for m, wrapper, before in self._wrap:
                d = m.__dict__
                before[0] = d.get("forward", _MISSING)
                d["forward"] = wrapper
        except BaseException:
            self.__exit__()
            raise
        return self.seen

    def __exit__(self, *exc: Any) -> None:
        if self._wrap is None:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            return
        for m, wrapper, before in self._wrap:
            d = m.__dict__
            if d.get("forward") is wrapper:  # else the forward itself replaced it: leave it
                if before[0] is _MISSING:
                    del d["forward"]
                else:
                    d["forward"] = before[0]

    def _wrapper(self, module: torch.nn.Module, name: str) -> tuple[Callable[..., Any], list]:
        """The watching ``forward`` of ``module`` and the cell holding what ``module.__dict__``
        held under ``forward`` before it (set at each installation)."""
        before: list = [_MISSING]
        note, grad_enabled = self._note, torch.is_grad_enabled
        mha = type(module) is torch.nn.MultiheadAttention

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not grad_enabled():
                note(name)
            f = before[0]
            if f is _MISSING:  # the class's forward, looked up at the call as torch does
                if mha and self.lean:  # (which it checks is still torch's)
                    return lean_mha.forward(module, *args, **kwargs)
                return type(module).forward(module, *args, **kwargs)
            return f(*args, **kwargs)

        return forward, before


def _nograd_hook(owned: dict[int, str], seen: list[str]) -> Callable[..., None]:
    """A global forward pre-hook appending to ``seen`` the name (from ``owned``) of every module
    called with gradients disabled."""

    def pre(module: torch.nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            name = owned.get(id(module))
            if name is not None and name not in seen:
                seen.append(name)

    return pre


_MISSING = object()


def _compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a scripted or ``torch.compile``'d module (or is one)."""
    opt = None
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.eval_frame import OptimizedModule as opt
    return any(
        isinstance(m, torch.jit.ScriptModule)
        or getattr(m, "_compiled_call_impl", None) is not None
        or (opt is not None and isinstance(m, opt))
        for m in model.modules()
    )


def nograd_error(names: list[str], types: str):
    """The error for parameters a forward used with gradients disabled (see
    :class:`fimfast.hooks.Capture`)."""
    from fimfast.types import UnsupportedModelError

    shown = ", ".join(repr(n) for n in names[:5])
    return UnsupportedModelError(
        f"module(s) {shown} with trainable parameters ran with gradients disabled inside the "
        f"forward (torch.no_grad, or torch.utils.checkpoint with use_reentrant=True{types}): "
        "autograd never sees their parameters, whose Fisher would read as 0. Drop the no_grad "
        "region (or use use_reentrant=False), or set requires_grad=False on those parameters to "
        "leave them out of the estimate"
    )
