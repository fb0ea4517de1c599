"""Backend parametrisation of the op tests: every kernel backend against the torch reference.

:func:`backend_params` runs a test once per kernel backend (``cpp``, ``triton``, ``cuda``);
:func:`require` returns the device it runs on, and when that backend cannot run here either skips
the test (with the registry's reason) or, when the backend is *expected* here, fails it:

* ``cpp``: expected in CI (``CI`` set to a true value) and whenever a compiled ``fimfast/_C*.so``
  lies in the source tree (a broken or stale build must not turn the kernel tests into skips);
* ``cuda``: expected in CI and with such a ``.so``, when torch sees a GPU;
* ``triton``: expected in CI (it is in the ``dev`` extras); it runs on a GPU, or on the CPU under
  ``TRITON_INTERPRET=1`` (tests/conftest.py sets it when there is no GPU).

``FIMFAST_DISABLE_EXT=1`` / ``FIMFAST_DISABLE_TRITON=1`` opt out explicitly (skips, not failures).
``FIMFAST_TEST_REQUIRE_BACKENDS=cpp,triton`` makes backends expected anywhere.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from fimfast import _env
from fimfast.ops.registry import backend_status

KERNEL_BACKENDS = ("cpp", "triton", "cuda")
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "fimfast")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def expected_reason(backend: str) -> str | None:
    """Why ``backend`` must run here (``None`` when a skip is acceptable)."""
    named = {b.strip() for b in os.environ.get("FIMFAST_TEST_REQUIRE_BACKENDS", "").split(",")}
    if backend in named:
        return "named in FIMFAST_TEST_REQUIRE_BACKENDS"
    if backend in ("cpp", "cuda"):
        if _env.disable_ext():
            return None
        if backend == "cuda" and not torch.cuda.is_available():
            return None
        if _truthy("CI"):
            return "CI is set"
        built = glob.glob(os.path.join(_SRC, "_C*.so")) + glob.glob(os.path.join(_SRC, "_C*.pyd"))
        if built:
            return f"{os.path.basename(built[0])} is in the source tree"
        return None
    if backend == "triton":
        if _env.disable_triton():
            return None
        return "CI is set" if _truthy("CI") else None
    return None


def backend_device(backend: str) -> torch.device:
    """The device a backend's tests run on."""
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def require(backend: str) -> torch.device:
    """The device ``backend`` runs on; skips (or fails, when it is expected here) if it cannot."""
    dev = backend_device(backend)
    if backend == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "triton needs a GPU or TRITON_INTERPRET=1 (TRITON_INTERPRET is set to " \
              f"{os.environ.get('TRITON_INTERPRET')!r})"
        ok = False
    else:
        ok, why = backend_status(backend, dev)
    if not ok:
        must = expected_reason(backend)
        if must is not None:
            pytest.fail(f"backend {backend!r} must run here ({must}) but cannot: {why}",
                        pytrace=False)
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    return dev


def backend_params(backends=KERNEL_BACKENDS):
    """pytest params for ``backends``, triton marked ``triton``."""
    return [
        pytest.param(b, id=b, marks=[pytest.mark.triton] if b == "triton" else [])
        for b in backends
    ]
