"""Shared fixtures: deterministic threads and seeds, the Triton interpreter on machines without a
GPU, and the paths to the test helpers and to the benchmarks package (its op counter)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if (_root := os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) not in sys.path:
    sys.path.append(_root)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _enable_triton_interpreter() -> None:
    """Run the Triton kernels on the CPU (``TRITON_INTERPRET=1``) when there is no GPU.

    Triton chooses between compiling and interpreting when a function is decorated with
    ``@triton.jit``, that is when ``fimfast.ops.triton.*`` is imported; this file is imported by
    pytest before any test module, so the variable is set in time. An explicit ``TRITON_INTERPRET``
    (``0`` included) is left as it is.
    """
    if "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        return
    early = sorted(m for m in sys.modules if m.startswith("fimfast.ops.triton."))
    if early:
        raise RuntimeError(
            f"{early} were imported before tests/conftest.py set TRITON_INTERPRET=1; their kernels "
            "would be compiled for a GPU that is not there. Set TRITON_INTERPRET=1 in the "
            "environment."
        )
    os.environ["TRITON_INTERPRET"] = "1"


_enable_triton_interpreter()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
