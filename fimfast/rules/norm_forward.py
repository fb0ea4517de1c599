"""The capturing forward of a batch norm (:class:`fimfast.rules.norm.BatchNormRule`), its usual
call recorded in one function, as :mod:`fimfast.rules.linear_forward` does for a linear layer.

The rule's own path (:meth:`fimfast.rules.Rule._take`, :meth:`BatchNormRule.capture`,
:meth:`~fimfast.rules.norm._ChannelNormRule.capture_stats`, :meth:`~fimfast.rules.norm._NormRule.
capture`, :meth:`fimfast.hooks.Capture.tap`, :meth:`~fimfast.hooks.Capture.record`) costs about
25 us of Python per layer and step. For a module whose rule is a :class:`BatchNormRule` that
leaves those methods as they are, :func:`recorder` records the usual call of a step (one tensor
argument, the uses of the module's parameters kept from an earlier forward of the same
parameter set, the output tapped directly, no functional recording) with the same
:class:`~fimfast.hooks.Tap` and :class:`~fimfast.hooks.Call` the rule records, copies of the
running statistics included; any other call goes to ``rule._take`` as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from fimfast.hooks import Call, Tap
from fimfast.rules.base import Rule
from fimfast.rules.linear_forward import same_params, usual_hit
from fimfast.rules.norm import BatchNormRule, _ChannelNormRule, _NormRule

_TENSOR = torch.Tensor
_CAPTURES = (BatchNormRule.capture, _NormRule.capture, Rule.capture)


def plain_batchnorm(rule: Any) -> bool:
    """Whether ``rule`` records a call as :class:`BatchNormRule` itself does."""
    ty = type(rule)
    return (isinstance(rule, BatchNormRule) and ty.capture is BatchNormRule.capture
            and ty.fold is BatchNormRule.fold and ty.lead is _NormRule.lead
            and ty.capture_stats is _ChannelNormRule.capture_stats
            and all(k.__dict__.get("capture", _NormRule.capture) in _CAPTURES for k in ty.__mro__)
            and ty._take is Rule._take and ty.inputs is Rule.inputs)


def recorder(module: torch.nn.Module, rule: Any) -> Callable[..., bool] | None:
    """``record(cap, args, kwargs, out)`` for the capturing forward of ``module``: records the
    call as ``rule`` would and returns ``True`` when the call is the usual one (see the module
    docstring), else ``False`` with nothing done; ``None`` unless ``rule`` is a plain
    :class:`BatchNormRule` (:func:`plain_batchnorm`)."""
    if not plain_batchnorm(rule):
        return None
    key = (id(module), 0)  # _NormRule.capture's tap key
    seen = (id(module), "columns")

    def record(cap: Any, args: tuple, kwargs: dict, out: Any) -> bool:
        hit = usual_hit(cap, args, kwargs, out, key, module, rule)
        if hit is None:
            return False
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        if not same_params(hit, w, b):
            return False
        memo = cap.memo
        if memo.get(seen, 2) > 1:  # several columns: the folding node (BatchNormRule.fold)
            return False
        uses = hit[3]
        running = not (module.training
                       or (module.running_mean is None and module.running_var is None))
        tap = Tap(out, out.shape, weakref.ref(out), out._version, key, True, 1, True)
        data = {"x": args[0].detach(), "weights": [u.param is w for u in uses],
                "memo": (memo, seen)}
        cap.calls.append(Call(module, rule, [tap], uses, data, hit[4], uses_key=hit[5]))
        # after the call's versions are noted, as capture_stats adds them
        data["stats"] = (module.running_mean.detach().clone(),
                         module.running_var.detach().clone()) if running else None
        return True

    return record
