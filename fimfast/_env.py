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


def get(name: str) -> str | None:
    """``os.environ.get(name)``, read now, without its cost for a name that is not set.

    ``os.environ.get`` of a missing name raises and catches a ``KeyError`` inside the mapping (a
    few microseconds; some variables are read at every step). This looks the name up in the
    mapping's own dict (``os.environ._data``, which ``os.environ[...] = ...``, ``del`` and
    ``putenv`` through it keep current), the encoded key made once per name; a replaced
    ``os.environ`` without that dict is read with its ``get``.
    """
    env = os.environ
    data = getattr(env, "_data", None)
    if type(data) is not dict:
        return env.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = env.encodekey(name)
    value = data.get(key)
    return None if value is None else env.decodevalue(value)


_KEYS: dict[str, object] = {}  # name -> its key in os.environ._data


def _flag(name: str) -> bool:
    return (get(name) or "0").strip().lower() in ("1", "true", "yes", "on")


def backend() -> str:
    """Backend named by ``FIMFAST_BACKEND`` (``auto`` when unset)."""
    raw = get("FIMFAST_BACKEND")
    if raw is None:
        return "auto"
    value = raw.strip().lower() or "auto"
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
    raw = get("FIMFAST_MEMORY_BUDGET_MB")
    if raw is None:
        return 256 * 2**20
    try:
        mb = float(raw)
    except ValueError as exc:
        raise ValueError(f"FIMFAST_MEMORY_BUDGET_MB must be a number; got {raw!r}") from exc
    if mb <= 0:
        raise ValueError(f"FIMFAST_MEMORY_BUDGET_MB must be > 0; got {raw!r}")
    return int(mb * 2**20)
