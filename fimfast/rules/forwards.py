"""Capturing forwards: the layer capture without forward hooks, for the rules that record a call
from its inputs and output (:meth:`fimfast.rules.Rule.install`).

A forward hook sends every call of its module through torch's hooked call path and is
registered and removed in every step. Instead, for the duration of a capture, each such module
gets an instance ``forward`` (made once per model and parameter set) that runs the class's
``forward`` and hands the call to the rule (:meth:`fimfast.rules.Rule._take`), as the hook
would: the output is tapped before the module's own forward hooks see it, a call without
gradients is noted for the no-grad check (:meth:`fimfast.hooks.Capture.without_grad`), and the
module's calls take torch's hook-free call path (the usual call of a linear layer is recorded
in one function: :mod:`fimfast.rules.linear_forward`). Measured in place on the MLP of workload (a)
(3 Linear layers, CPU, 1 thread), what the capture adds to an EMPIRICAL step's forward went from
~230 to ~170 µs, 0.02-0.025 of a training step
(benchmarks/results/persample_forwards_cpu_2026-12-06.md).

A module keeps the hook when its rule installs itself otherwise (a patched forward, a hook of its
own), when it already has an instance ``forward`` at the start of a step (the user's, or another
capture's), and for the whole model when it holds a compiled or scripted module (an instance
``forward`` would be a guard of compiled code; :func:`fimfast.nograd._compiled`) or an
``nn.DataParallel`` (its replicas copy the instance ``forward``, which runs the original module).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fimfast.hooks import Capture
from fimfast.nograd import _compiled
from fimfast.rules.base import Rule
from fimfast.rules.linear_forward import recorder
from fimfast.rules.norm_forward import recorder as norm_recorder


class Forwards:
    """The capturing forwards of one model's modules with a rule (see the module docstring).

    Args:
        model: the network.
        modules: its ``(module, rule)`` pairs (:func:`fimfast.hooks.targets`); only this list
            object is handled by :meth:`enter`.
    """

    def __init__(self, model: torch.nn.Module, modules: list[tuple[torch.nn.Module, Any]]):
        self.modules = modules
        self.cap: Capture | None = None  # the capture the forwards record into (None: none)
        wrap = not _compiled(model) and not any(
            isinstance(m, torch.nn.DataParallel) for m in model.modules())
        self._wrap = [(m, r, self._forward(m, r)) for m, r in modules if wrap and _plain(r)]
        ids = {id(m) for m, _, _ in self._wrap}
        self._rest = [(m, r) for m, r in modules if id(m) not in ids]
        self._on: list[tuple[torch.nn.Module, Callable]] = []

    def enter(
        self, cap: Capture, modules: list[tuple[torch.nn.Module, Any]]
    ) -> list[tuple[torch.nn.Module, Any]]:
        """Install the forwards recording into ``cap``; returns the pairs of ``modules`` left to
        their rule's own install (all of them when ``modules`` is not :attr:`modules`)."""
        if modules is not self.modules:
            return modules
        rest = self._rest
        self.cap = cap
        for m, r, fwd in self._wrap:
            d = m.__dict__
            if "forward" in d:  # an instance forward of the user's: the hook leaves it alone
                rest = [*rest, (m, r)]
                continue
            d["forward"] = fwd
            self._on.append((m, fwd))
            cap.noting.add(id(m))
        return rest

    def exit(self) -> None:
        """Put every module's ``forward`` back (a forward that replaced the wrapper is kept)."""
        self.cap = None
        for m, fwd in self._on:
            d = m.__dict__
            if d.get("forward") is fwd:
                del d["forward"]
        self._on.clear()

    def _forward(self, module: torch.nn.Module, rule: Rule) -> Callable[..., Any]:
        take, grad_enabled, owner = rule._take, torch.is_grad_enabled, self
        # a plain linear layer's or batch norm's usual call, recorded inline
        fast = recorder(module, rule) or norm_recorder(module, rule)

        def forward(*args: Any, **kwargs: Any) -> Any:
            # the class's forward, looked up at the call as torch does
            out = type(module).forward(module, *args, **kwargs)
            cap = owner.cap
            if cap is None:
                return out
            if not grad_enabled():
                cap.without_grad(module)
                return out
            if cap.derived is not None and _recorded(cap, out):
                return out
            if fast is not None and fast(cap, args, kwargs, out):
                return out
            tapped = take(cap, module, args, kwargs, out)
            return out if tapped is None else tapped

        return forward


def _recorded(cap: Capture, out: Any) -> bool:
    """Whether ``out`` is the output of the last call recorded, by the functional mode
    (:mod:`fimfast.functional`): the module's ``forward`` was called without ``__call__``
    (``module.forward(x)``), whose hooks tell the mode that the call is the module's."""
    calls = cap.calls
    return bool(calls) and any(t.out() is out for t in calls[-1].taps)


def _plain(rule: Any) -> bool:
    """Whether ``rule`` records its calls through :meth:`Rule.install`'s forward hook."""
    ty = type(rule)
    return isinstance(rule, Rule) and ty.install is Rule.install and ty._hook is Rule._hook
