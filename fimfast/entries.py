"""The check the workflows make of a Fisher diagonal they are given (EWC, merging, Laplace,
sensitivity): every entry finite, and, where the workflow needs it, none negative. A NaN would
otherwise pass a ``< 0`` test and turn a penalty, a merge or a posterior into NaN."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fimfast.finite import all_finite

__all__ = ["check_entries", "finite_scalar", "nonnegative_number", "same_scale"]


def check_entries(f: torch.Tensor, label: str, nonnegative: bool = True,
                  negative: str | None = None) -> None:
    """Raise a ``ValueError`` naming ``label`` if ``f`` has a NaN or an infinite entry, or, with
    ``nonnegative``, a negative one (``negative``: that message instead of the default)."""
    f = f.coalesce().values() if f.is_sparse else f
    if not all_finite([f]):
        bad = int((~torch.isfinite(f)).sum())
        raise ValueError(f"{label} has {bad} non-finite entries (NaN/Inf); a Fisher diagonal "
                         "is finite")
    if nonnegative and bool((f < 0).any()):
        raise ValueError(negative or f"{label} has negative entries; a Fisher diagonal is >= 0")


def nonnegative_number(value: float, name: str) -> float:
    """``float(value)``, refused unless a finite number ``>= 0`` (a ``ValueError`` naming it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a number >= 0 and finite; got {value!r}")
    return float(value)


def finite_scalar(s: float) -> float:
    """``s``, refused unless finite (the scalar of ``DiagFIM * s`` and ``DiagFIM / s``)."""
    if not math.isfinite(s):
        raise ValueError(f"scalar must be finite; got {s!r}")
    return s


def same_scale(mine: Mapping, theirs: Mapping, name: str) -> None:
    """Refuse adding (or subtracting) a ``"sum"`` and a ``"mean"`` Fisher (``mine``, ``theirs``:
    their ``meta``): the result would keep one reduction label for numbers on two scales, and
    :class:`~fimfast.DiagLaplace` would scale it by the row count as a whole."""
    a, b = mine.get("reduction"), theirs.get("reduction")
    if a is not None and b is not None and a != b:
        raise ValueError(f"{name}: reduction={b!r} and this DiagFIM's reduction={a!r} are on "
                         "different scales (a sum over rows and a mean); multiply the mean by "
                         "its meta['count'] and relabel it first")
