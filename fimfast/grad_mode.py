"""The caller's context around a Fisher step: its autograd mode, and the estimator's backend.

Every estimator differentiates the model (per-sample columns, probes, sampled labels all need a
backward), so a step cannot honour a caller's ``torch.no_grad()``: evaluation loops often run
under one. :func:`autograd_on` runs a step with gradients enabled whatever the caller's grad mode
(the model's own ``torch.no_grad`` regions inside its forward still apply, and are refused as
before where they hide trainable parameters). ``torch.inference_mode()`` cannot be lifted that
way (the tensors it makes carry no version counter and cannot be saved for a backward): a step
inside it is refused, naming the call, before anything runs. A batch whose tensors were made
under ``torch.inference_mode()`` fails in the model's forward; :func:`inference_hint` names the
cause in that error.

Given ``backend`` (the estimator's ``backend`` option, read from the call's first argument), the
step runs under :class:`fimfast.ops.registry.step_backend`: every op the step calls without a
backend of its own (the channel norms' terms, the factor sums, ...) takes that backend where it
implements it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from fimfast.ops import registry

__all__ = ["autograd_on", "inference_hint"]

_F = TypeVar("_F", bound=Callable[..., Any])


def autograd_on(fn: _F | None = None, *, backend: Callable[[Any], str | None] | None = None):
    """``fn`` run with gradients enabled (``torch.enable_grad``) when the caller disabled them,
    refused with a ``RuntimeError`` naming ``fn`` inside ``torch.inference_mode()``, and (with
    ``backend``, a function of the first argument) under
    :class:`~fimfast.ops.registry.step_backend` of ``backend(args[0])``. Used bare
    (``@autograd_on``) or with the keyword (``@autograd_on(backend=...)``)."""
    if fn is None:
        return functools.partial(autograd_on, backend=backend)
    name = fn.__qualname__ if "." in fn.__qualname__ else f"fimfast.{fn.__qualname__}"

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            if torch.is_inference_mode_enabled():
                raise RuntimeError(
                    f"{name} was called inside torch.inference_mode(): a Fisher step "
                    "differentiates the model, which inference mode forbids (its tensors cannot "
                    "be saved for a backward). Call it outside torch.inference_mode() (inside "
                    "torch.no_grad() it runs with gradients enabled)"
                )
            with torch.enable_grad():
                return run(*args, **kwargs)
        b = backend(args[0]) if backend is not None else None
        if (b is None or b == "auto") and registry.current_step_backend() is None:
            return fn(*args, **kwargs)
        with registry.step_backend(b):
            return fn(*args, **kwargs)

    return run


def inference_hint(exc: BaseException) -> str:
    """The explanation to add to a forward's error ``exc`` caused by inference tensors in the
    batch (``""`` for any other error)."""
    if "Inference tensors" not in str(exc):
        return ""
    return ("; the batch holds tensors made under torch.inference_mode() (inference tensors), "
            "which autograd cannot save for the backward every estimator takes: make the batch "
            "outside inference mode (torch.no_grad() is enough) or pass t.clone() made outside it")
