"""Lazy loading of the compiled extension ``fimfast._C`` (the ``cpp`` and ``cuda`` backends).

Importing :mod:`fimfast` never loads it: the first op that asks for the ``cpp``/``cuda`` backend
does, through :func:`load`. A missing or broken extension is reported as a reason string (and a
logged warning), never as an ImportError.
"""

from __future__ import annotations

import logging
from functools import cache

logger = logging.getLogger("fimfast")


@cache
def load() -> tuple[bool, str]:
    """Load ``fimfast._C`` once; returns ``(ok, reason)``."""
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from fimfast import _C  # noqa: F401
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        reason = (
            f"fimfast._C is not available ({type(exc).__name__}: {exc}); "
            "reinstall fimfast with a C++ compiler present to build it"
        )
        logger.warning(reason)
        return False, reason
    return True, "ok"


def has_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    ok, _ = load()
    if not ok:
        return False
    from fimfast import _C

    return bool(getattr(_C, "WITH_CUDA", False))
