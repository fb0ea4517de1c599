"""Backend parametrisation of the op tests: every kernel backend against the torch reference.

:func:`backend_params` runs a test once per kernel backend (``cpp``, ``triton``, ``cuda``);
:func:`require` skips it with the registry's reason when that backend cannot run here and returns
the device it runs on. Triton runs on a
GPU, or on the CPU under ``TRITON_INTERPRET=1`` (``scripts/test.sh`` sets it).
"""

from __future__ import annotations

import os

import pytest
import torch

from fimfast.ops.registry import backend_status

KERNEL_BACKENDS = ("cpp", "triton", "cuda")


def backend_device(backend: str) -> torch.device:
    """The device a backend's tests run on."""
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def require(backend: str) -> torch.device:
    """Skip (with the registry's reason) unless ``backend`` runs here; returns its device."""
    dev = backend_device(backend)
    if backend == "triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1 (scripts/test.sh sets it)")
    ok, why = backend_status(backend, dev)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    return dev


def backend_params(backends=KERNEL_BACKENDS):
    """pytest params for ``backends``, triton marked ``triton``."""
    return [
        pytest.param(b, id=b, marks=[pytest.mark.triton] if b == "triton" else [])
        for b in backends
    ]
