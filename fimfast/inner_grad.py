"""Backward passes that build a graph inside the estimator's forward.

A forward may differentiate part of itself with ``create_graph=True``: an input-gradient feature
(``g = autograd.grad(energy(x), x, create_graph=True)`` added to the features), a MAML inner step
(``W - lr * autograd.grad(loss, W, create_graph=True)``), ``torch.func.grad`` or
``torch.autograd.functional.jacobian(..., create_graph=True)`` inside ``forward``. The graph that
backward builds reads the layers' parameters and saved tensors again (a ``Linear``'s input
gradient ``g_out @ W`` is a new use of ``W``, reached through the ``W.t()`` its forward made), so
the logits depend on the parameters of every layer it ran through along paths that do not pass
through the layer's output: a rule, which sees the output gradient only, would miss them, and the
count of edges into each parameter does not see them (they meet the forward's own nodes before
the parameter's accumulator).

:func:`watch` makes every call recorded before such a backward ran ineligible for its rule
(``Call.ok`` false, :data:`REASON`): its parameters take the generic path, whose per-sample
gradients are autograd's through the whole graph. Calls recorded after it are not affected (the
backward could not run through them). A backward without ``create_graph`` builds nothing the
logits could depend on. Detected through the autograd engine object that ``torch.autograd.grad``
and ``Tensor.backward`` both run (``Variable._execution_engine``), replaced by a forwarding proxy
while the capture is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch.autograd.variable import Variable

REASON = "a backward with create_graph=True ran through its call inside the forward"

_CREATE_GRAPH = 3  # position of create_graph in the engine's run_backward


class _Engine:
    """Forwards everything to the engine it wraps; ``run_backward`` with ``create_graph`` first
    calls ``on_graph()``."""

    def __init__(self, engine: Any, on_graph: Callable[[], None]):
        self._engine = engine
        self._on_graph = on_graph

    def run_backward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("create_graph", args[_CREATE_GRAPH] if len(args) > _CREATE_GRAPH else False):
            self._on_graph()
        return self._engine.run_backward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _swapped(on_graph: Callable[[], None]) -> Callable[[], None]:
    """Torch's engine replaced by an :class:`_Engine` calling ``on_graph``; returns the function
    that puts it back."""
    engine = Variable._execution_engine
    Variable._execution_engine = _Engine(engine, on_graph)

    def undo() -> None:
        Variable._execution_engine = engine

    return undo


def watch(capture: Any) -> Callable[[], None]:
    """Watch the backward passes run while ``capture`` (a :class:`fimfast.hooks.Capture`)
    records (each with ``create_graph`` marks the calls recorded so far); returns the function
    that stops watching (it puts the engine back)."""

    def mark() -> None:
        if capture.active:
            for call in capture.calls:
                if call.ok:
                    call.ok, call.reason = False, REASON

    return _swapped(mark)


@contextmanager
def graph_built() -> Iterator[list]:
    """``with graph_built() as seen:`` the body's backward passes watched: ``seen`` is non-empty
    after it when one of them ran with ``create_graph=True`` (the structured engine refuses the
    representations built from a layer's own inputs and output gradients then)."""
    seen: list = []
    undo = _swapped(lambda: seen.append(True))
    try:
        yield seen
    finally:
        undo()
