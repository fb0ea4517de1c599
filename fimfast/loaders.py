"""The check of the ``loader`` argument of the one-shot entry points (``fimfast.diag_fisher``,
``fimfast.fisher``, ``FisherAccumulator.add``): an iterable of batches, not one batch.

Iterating one batch does not fail: a tuple ``(inputs, targets)`` yields the inputs, then the
targets, each stepped as a batch of inputs (with ``(N, C)`` regression targets, the Fisher at
the inputs plus the Fisher at the targets); a tensor yields its samples without their batch axis;
a mapping yields its keys. Each is refused, naming ``loader`` and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_loader"]


def check_loader(loader: Any, name: str = "loader") -> None:
    """Raise a ``TypeError`` naming ``name`` if ``loader`` is one batch: a tensor, a mapping, or
    a tuple of tensors (``(inputs, labels)``). A list of batches (tuples, tensors or mappings),
    a generator or a ``DataLoader`` passes."""
    if isinstance(loader, torch.Tensor):
        what = "a tensor (iterating it steps each sample without its batch axis)"
    elif isinstance(loader, Mapping):
        what = "a mapping (one batch of named inputs; iterating it gives its keys)"
    elif isinstance(loader, tuple) and loader and all(
        isinstance(b, torch.Tensor) for b in loader
    ):
        what = ("a tuple of tensors, which reads as one batch (inputs, labels) (iterating it "
                "steps each of its tensors as a batch of inputs)")
    else:
        return
    raise TypeError(f"{name} must be an iterable of batches; got {what}: pass [batch] for one "
                    "batch, and several tensor batches as a list")
