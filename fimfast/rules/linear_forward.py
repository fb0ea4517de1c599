"""The capturing forward of a linear layer (:class:`fimfast.rules.linear.LinearRule`), its
usual call recorded in one function.

:class:`fimfast.rules.forwards.Forwards` gives a module an instance ``forward`` that hands each
call to the rule (:meth:`fimfast.rules.Rule._take`, then :meth:`LinearRule.capture`, which calls
:func:`~fimfast.rules.linear.weight_bias`, :meth:`fimfast.hooks.Capture.uses_of`,
:func:`~fimfast.rules.linear.folded`, :meth:`~fimfast.hooks.Capture.tap` and
:meth:`~fimfast.hooks.Capture.record`): nine Python calls per layer call, each read cold in a
step whose forward and backward have streamed megabytes through the caches. For a module whose
rule is a :class:`LinearRule` that leaves ``_take``, ``inputs`` and ``capture`` as they are,
:func:`recorder` gives the forward one function that records the usual call of a step (the
rule's uses of this module's parameters kept from an earlier forward of the same parameter
set, the output tapped directly, one tensor argument, no folded batch, no functional recording)
with the same :class:`~fimfast.hooks.Tap` and :class:`~fimfast.hooks.Call` the rule would
record; any other call goes to ``rule._take`` as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from fimfast.hooks import Call, Tap
from fimfast.rules.base import Rule
from fimfast.rules.linear import LinearRule, weight_bias

_TENSOR = torch.Tensor


def plain_linear(rule: Any) -> bool:
    """Whether ``rule`` records a call as :class:`LinearRule` itself does (a subclass that
    changes only class attributes, such as ``transposed``)."""
    ty = type(rule)
    return (isinstance(rule, LinearRule) and ty.capture is LinearRule.capture
            and ty._take is Rule._take and ty.inputs is Rule.inputs)


def recorder(module: torch.nn.Module, rule: Any) -> Callable[..., bool] | None:
    """``record(cap, args, kwargs, out)`` for the capturing forward of ``module``: records the
    call as ``rule`` would and returns ``True`` when the call is the usual one (see the module
    docstring), else ``False`` with nothing done; ``None`` unless ``rule`` is a plain
    :class:`LinearRule` (:func:`plain_linear`)."""
    if not plain_linear(rule):
        return None
    key = (id(module), 0)  # LinearRule.capture's tap key

    def record(cap: Any, args: tuple, kwargs: dict, out: Any) -> bool:
        hit = usual_hit(cap, args, kwargs, out, key, module, rule)
        if hit is None:
            return False
        N = cap.samples  # a batch folded into the first dim (rules.linear.folded): the rule's
        if N is not None and N >= 1 and out.dim() >= 2:
            M = out.shape[0]
            if M > N and M % N == 0:
                return False
        if not same_params(hit, *weight_bias(module)):
            return False
        x = args[0]
        tap = Tap(out, out.shape, weakref.ref(out), out._version, key, True, out.dim() - 1)
        x = x.detach() if x.requires_grad else x
        cap.calls.append(Call(module, rule, [tap], hit[3], {"x": x}, hit[4], uses_key=hit[5]))
        return True

    return record


def usual_hit(cap: Any, args: tuple, kwargs: dict, out: Any, key: tuple, module,
              rule) -> tuple | None:
    """The entry of ``cap.memo`` that keeps ``rule``'s uses of ``module``'s parameters when the
    call is a usual one (one tensor argument, a tensor output in the graph tapped directly under
    ``key``, no functional recording, not inside a backward), else ``None``; whether the module
    still holds the same tensors is :func:`same_params`' (read after, as the rule reads them)."""
    if (cap.derived is not None or not cap.active or kwargs or len(args) != 1
            or type(out) is not _TENSOR or out.grad_fn is None
            or type(args[0]) is not _TENSOR or key not in cap.direct or _task() != -1):
        return None
    hit = cap.memo.get(key[0])
    if hit is None or hit[5] is None or hit[0] is not module or hit[1] is not rule:
        return None
    return hit


def same_params(hit: tuple, w, b) -> bool:
    """Whether the kept uses of :func:`usual_hit`'s entry are those of ``(w, b)``."""
    kept = hit[2]
    return len(kept) == 2 and kept[0] is w and kept[1] is b


_task = torch._C._current_graph_task_id
