"""What a layer's call kept, changed before the rules read it after the forward.

A rule forms its per-sample squares after the forward from what the call kept (``call.data``:
the layer's input, detached, which shares the input's storage and version counter) and from its
module's settings (``padding``, ``eps``, ``padding_idx``, ``num_groups``). A forward that writes
into that input after the call (``y = lin(h); h.mul_(2)``, ``h.zero_()``, ``h.copy_(...)``)
leaves the rule reading values the layer never saw. torch's own backward refuses such a graph
where the layer's backward saved the input (``one of the variables needed for gradient computation
has been modified by an inplace operation``), but the per-sample engine's backward stops at the
layer's output tap and never runs that check: the rule would square the wrong input silently.
Likewise a forward that changes a module's settings between (or after) its calls (``conv.padding
= 1`` before calling it again, ``norm.eps = ...``) leaves the rule forming an earlier call's
terms with the later settings.

:class:`Calls` (the capture's list of calls) notes, as each call is recorded, the version counter
of every tensor of its ``data`` (keeping the tensors) and its module's plain public attributes;
:func:`check` sends a call whose tensors moved (:data:`REASON`) or whose module's settings differ
(:data:`SETTINGS`) to the generic path: autograd's per-sample gradients through the graph the
forward built, exact for settings changed; for an overwritten input they raise torch's error where
torch's backward needs it (:func:`refuse` names the parameters) and are exact where it does not (a
layer whose weight is frozen saves no input).

A call recorded inside a forward-mode AD level (``torch.autograd.forward_ad.dual_level``, a
``make_dual`` input) computes tangents too: the forward reads the call's parameters again in
them (a ``Linear``'s tangent ``t @ W^T``), paths to the logits that do not pass through the
output the rule taps. Such calls take the generic path (:data:`FORWARD_AD`), as the calls before
a backward with ``create_graph=True`` do (:mod:`fimfast.inner_grad`).
"""

from __future__ import annotations

import operator
import weakref

import torch
import torch.autograd.forward_ad as _fwad

from fimfast.types import UnsupportedModelError

REASON = "its input was modified in place after its call"

_TENSOR = torch.Tensor
_PLAIN = frozenset((bool, int, float, str, type(None)))
# module -> the getter of its settings (the names found at its first call)
_GETTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SETTINGS = "its module's settings changed after its call (padding, eps, padding_idx, ...)"
FORWARD_AD = "called inside a forward-mode AD level (its tangents read the parameters again)"


class Calls(list):
    """A capture's calls (a list), with the version counters of the tensors of each call's
    ``data`` and its module's settings when it was recorded (:attr:`versions`,
    :attr:`settings`, in the same order)."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[tuple[int, ...]] = []
        self.settings: list[tuple | None] = []
        self.tensors: list[list[torch.Tensor]] = []  # the tensors whose versions were noted

    def append(self, call) -> None:
        super().append(call)
        if torch.compiler.is_compiling():  # recorded while dynamo traces (a compiled region):
            self.versions.append(())  # its output never reaches the logits (generic path);
            self.settings.append(None)  # nothing here is traced (a constant there)
            self.tensors.append([])
            return
        if _fwad._current_level >= 0 and call.ok:  # tangents: paths the rules do not see
            call.ok, call.reason = False, FORWARD_AD
        ts = tensors(call.data)
        self.tensors.append(ts)
        self.versions.append(tuple(map(_VERSION, ts)))
        self.settings.append(settings(call.module))


def settings(module) -> tuple | None:
    """The public plain attributes of ``module`` (an ``nn.Module``; ``None`` for a functional
    call's site), those that held numbers, strings, flags or tuples of them when it was first
    seen (``padding``, ``eps``, ``padding_idx``, ``num_groups``, ``training``), which the rules
    read when they form the terms, after the forward."""
    if not isinstance(module, torch.nn.Module):
        return None
    get = _GETTERS.get(module)
    if get is None:
        names = [k for k, v in module.__dict__.items()
                 if k[0] != "_" and (type(v) in _PLAIN or (type(v) is tuple and all(
                     type(e) in _PLAIN for e in v)))]
        get = _GETTERS[module] = operator.attrgetter(*names) if names else _none
    return get(module)


def _none(module) -> tuple:
    return ()


def _changed(module, was: tuple) -> bool:
    try:
        return bool(settings(module) != was)
    except (AttributeError, RuntimeError):  # deleted, or set to a tensor since
        return True


def versions(data: dict) -> tuple[int, ...]:
    """The version counters of the tensors ``data`` holds (:func:`tensors`), in order."""
    return tuple(map(_VERSION, tensors(data)))


def tensors(data: dict) -> list[torch.Tensor]:
    """The tensors ``data`` holds: its values, and the items of the lists, tuples and mappings
    among them (two levels down: a recurrent layer's directions, a contraction's operands), in
    order; ``memo`` (a rule's record shared by the calls) left out."""
    out: list[torch.Tensor] = []
    for k, v in data.items():
        if type(v) is _TENSOR or isinstance(v, _TENSOR):
            out.append(v)
        elif k != "memo" and isinstance(v, _NESTS):
            _nested(v, out, 2)
    return out


def _nested(v, out: list, depth: int) -> None:
    for t in (v.values() if isinstance(v, dict) else v):
        if isinstance(t, _TENSOR):
            out.append(t)
        elif depth > 1 and isinstance(t, _NESTS):
            _nested(t, out, depth - 1)


_NESTS = (list, tuple, dict)
_VERSION = operator.attrgetter("_version")


def check(cap) -> None:
    """Send the calls of ``cap`` (a :class:`fimfast.hooks.Capture`) whose kept tensors were
    modified in place, or whose module's settings changed, since the call to the generic
    path."""
    calls = cap.calls
    if type(calls) is not Calls:
        return
    for call, before, was, ts in zip(calls, calls.versions, calls.settings, calls.tensors):
        if not call.ok:
            continue
        # the tensors noted when the call was recorded (data only grows after it)
        if before and tuple(map(_VERSION, ts)) != before:
            call.ok, call.reason = False, REASON
        elif was is not None and _changed(call.module, was):
            call.ok, call.reason = False, SETTINGS


def refuse(error: RuntimeError, plan, names: list[str]) -> None:
    """Raise :class:`~fimfast.types.UnsupportedModelError` for torch's ``error`` of the generic
    path's backward (a tensor it saved was modified in place) when :func:`check` sent parameters
    there for that reason, naming them; return otherwise (the caller re-raises ``error``)."""
    if "modified by an inplace operation" not in str(error):
        return
    hit = [names[i] for i in plan.generic if plan.reasons.get(i) == REASON]
    if hit:
        raise UnsupportedModelError(
            f"the input of the layer holding {hit} was modified in place after the layer's call "
            "(the forward writes into a tensor the layer read: the per-sample squares would read "
            "values the layer never saw, and torch's backward refuses the graph); write into a "
            "copy (h = h.clone()) instead"
        ) from error
