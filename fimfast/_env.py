"""Every ``FIMFAST_*`` environment variable the library reads, in one place.

* ``FIMFAST_BACKEND``: kernel backend when no ``backend`` option is given (``auto``, ``torch``,
  ``triton``, ``cuda`` or ``cpp``; default ``auto``).
* ``FIMFAST_DISABLE_EXT``: ``1`` hides the compiled extension ``fimfast._C`` (``cpp``/``cuda``).
* ``FIMFAST_DISABLE_TRITON``: ``1`` hides triton (the ``triton`` backend).
* ``FIMFAST_MEMORY_BUDGET_MB``: working memory of one chunk of the per-sample engines (256).

``setup.py`` reads ``FIMFAST_BUILD_CUDA`` (``0``/``1``) at build time (see the README).
"""

from __future__ import annotations

import os

_BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def backend() -> str:
    """Backend named by ``FIMFAST_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("FIMFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"FIMFAST_BACKEND must be one of {', '.join(_BACKENDS)}; got {value!r}")
    return value


def disable_ext() -> bool:
    """Whether ``FIMFAST_DISABLE_EXT`` hides the compiled extension."""
    return _flag("FIMFAST_DISABLE_EXT")


def disable_triton() -> bool:
    """Whether ``FIMFAST_DISABLE_TRITON`` hides triton."""
    return _flag("FIMFAST_DISABLE_TRITON")


def memory_budget_bytes() -> int:
    """Working-memory budget of one chunk of the per-sample engines, in bytes."""
    raw = os.environ.get("FIMFAST_MEMORY_BUDGET_MB", "256")
    try:
        mb = float(raw)
    except ValueError as exc:
        raise ValueError(f"FIMFAST_MEMORY_BUDGET_MB must be a number; got {raw!r}") from exc
    if mb <= 0:
        raise ValueError(f"FIMFAST_MEMORY_BUDGET_MB must be > 0; got {raw!r}")
    return int(mb * 2**20)
