"""Capturing forwards of the Kronecker layers: the capture of
:func:`fimfast.structured.capture.capture` without forward hooks.

A forward hook sends every call of its module through torch's hooked call path, and was
registered and removed on every batch. Instead, for the duration of a batch's forward, each
captured module gets an instance ``forward`` (made once per :class:`~fimfast.structured.capture.
Layer`, which the structure cache keeps between calls: :mod:`fimfast.structured.structure`) that
runs its class's ``forward`` and records the call as the hook did (:func:`record`), as the
capturing forwards of the diagonal engine do (:mod:`fimfast.rules.forwards`). The call is recorded
before the module's own forward hooks see the output (the diagonal engine's hooks are prepended
for the same reason): the gradient tapped is the one at the output of the layer's own map, also
where a hook of the user's replaces that output.

Modules keep the hook (:func:`instance_forwards` is false) in a model that holds a compiled or
scripted module (an instance ``forward`` would be a guard of compiled code) or an
``nn.DataParallel`` (its replicas copy the instance ``forward``). That hook is put before the
module's own forward hooks for the same reason (before, it came after them: a hook of the user's
that doubled a Linear's output halved every output gradient the capture took).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_UNWRAPPABLE = (torch.jit.ScriptModule, nn.DataParallel)
_PY_NODE = torch._C._FunctionBase  # an autograd.Function's node (get_gradient_edge's own test)


def instance_forwards(model: nn.Module, refuse_batch_statistics: Callable,
                      modules: list[nn.Module] | None = None) -> bool:
    """Whether the layers of ``model`` may be captured through instance forwards (no compiled,
    scripted or ``DataParallel`` module in it), in the walk of the modules that also refuses a
    BatchNorm normalising with batch statistics (``refuse_batch_statistics(model)`` raises the
    error naming it). ``modules``: ``list(model.modules())`` where the caller has it."""
    kinds = _UNWRAPPABLE
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.eval_frame import OptimizedModule

        kinds = (*kinds, OptimizedModule)
    plain = True
    for m in model.modules() if modules is None else modules:
        if isinstance(m, _BATCH_NORM) and (m.training or m.running_mean is None):
            refuse_batch_statistics(model)
        if plain and (isinstance(m, kinds) or getattr(m, "_compiled_call_impl", None) is not None):
            plain = False
    return plain


class Edge:
    """The gradient edge of a layer output (:func:`torch.autograd.graph.get_gradient_edge`), an
    input of ``torch.autograd.grad`` in place of the output, with the output's shape, dtype and
    device. An output made by a built-in operation (a C++ node, which keeps the graph alive
    itself) gets its edge ``(grad_fn, output_nr)`` directly."""

    __slots__ = ("edge", "shape", "dtype", "device")

    def __init__(self, y: torch.Tensor):
        fn = y.grad_fn
        self.edge = GradientEdge(fn, y.output_nr) if fn is not None and \
            not isinstance(fn, _PY_NODE) else get_gradient_edge(y)
        self.shape, self.dtype, self.device = y.shape, y.dtype, y.device

    def numel(self) -> int:
        return self.shape.numel()


def record(layer: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """Record the call ``(input, tap, None)`` of ``layer``; returns the output to use in place of
    ``out`` (``None``: ``out`` itself). An output without a node (made without gradient tracking)
    is tapped as ``out + z``, ``z`` a zero scalar expanded to its shape."""
    if out.grad_fn is not None:  # no extra operation on the output
        layer.calls.append((x.detach(), Edge(out), None))
        return None
    z = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
    z = z.expand(out.shape)
    layer.calls.append((x.detach(), z, None))
    return out + z


def hook_of(layer: Any) -> Callable:
    """The forward hook (``with_kwargs=True``) recording the calls of ``layer``'s module, whose
    input may be passed by keyword (``m(input=x)``; before, an ``IndexError``)."""

    def hook(mod, args, kwargs, out):
        return record(layer, args[0] if args else kwargs["input"], out)

    return hook


def forward_of(layer: Any) -> Callable:
    """The instance ``forward`` recording the calls of ``layer``'s module (made once per layer):
    the class's ``forward``, looked up at the call as torch does, then :func:`record`."""
    m = layer.module

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = type(m).forward(m, *args, **kwargs)
        tapped = record(layer, args[0] if args else kwargs["input"], out)
        return out if tapped is None else tapped

    return forward


def install(layers: list, plain: bool, handles: list, on: list) -> None:
    """Start recording the calls of the (non-attention) ``layers``: instance forwards where
    ``plain`` (appended to ``on`` as ``(module, forward)``), forward hooks otherwise (their
    handles appended to ``handles``)."""
    seen: set[int] = set()
    for layer in layers:
        m = layer.module
        if isinstance(m, nn.MultiheadAttention) or id(m) in seen:
            continue
        seen.add(id(m))
        if not plain:  # before the module's own hooks: the output of the layer's own map
            handles.append(m.register_forward_hook(hook_of(layer), prepend=True,
                                                   with_kwargs=True))
            continue
        if layer.forward is None:
            layer.forward = forward_of(layer)
        m.__dict__["forward"] = layer.forward
        on.append((m, layer.forward))


def uninstall(handles: list, on: list) -> None:
    """Stop recording: hooks removed, every instance ``forward`` put back (a ``forward`` that
    replaced the capturing one during the batch is kept)."""
    for h in handles:
        h.remove()
    for m, fwd in on:
        d = m.__dict__
        if d.get("forward") is fwd:
            del d["forward"]
