"""The caller's autograd mode around a Fisher step.

Every estimator differentiates the model (per-sample columns, probes, sampled labels all need a
backward), so a step cannot honour a caller's ``torch.no_grad()``: evaluation loops often run
under one. :func:`autograd_on` runs a step with gradients enabled whatever the caller's grad mode
(the model's own ``torch.no_grad`` regions inside its forward still apply, and are refused as
before where they hide trainable parameters). ``torch.inference_mode()`` cannot be lifted that
way (the tensors it makes carry no version counter and cannot be saved for a backward): a step
inside it is refused, naming the call, before anything runs. A batch whose tensors were made
under ``torch.inference_mode()`` fails in the model's forward; :func:`inference_hint` names the
cause in that error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["autograd_on", "inference_hint"]

_F = TypeVar("_F", bound=Callable[..., Any])


def autograd_on(fn: _F) -> _F:
    """``fn`` run with gradients enabled (``torch.enable_grad``) when the caller disabled them;
    refused with a ``RuntimeError`` naming ``fn`` inside ``torch.inference_mode()``."""
    name = fn.__qualname__ if "." in fn.__qualname__ else f"fimfast.{fn.__qualname__}"

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{name} was called inside torch.inference_mode(): a Fisher step differentiates "
                "the model, which inference mode forbids (its tensors cannot be saved for a "
                "backward). Call it outside torch.inference_mode() (inside torch.no_grad() it "
                "runs with gradients enabled)"
            )
        with torch.enable_grad():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def inference_hint(exc: BaseException) -> str:
    """The explanation to add to a forward's error ``exc`` caused by inference tensors in the
    batch (``""`` for any other error)."""
    if "Inference tensors" not in str(exc):
        return ""
    return ("; the batch holds tensors made under torch.inference_mode() (inference tensors), "
            "which autograd cannot save for the backward every estimator takes: make the batch "
            "outside inference mode (torch.no_grad() is enough) or pass t.clone() made outside it")
