"""sq_matmul: every kernel backend against the torch reference, both against the
float64 definition (tests/ops/spec.py)."""

from __future__ import annotations

import pytest
import spec
import torch
from kernel_parity import assert_kernel_close, assert_reference_close, layout
from op_backends import backend_params, require

from fimfast import ops

SHAPES = {  # (N, O, I)
    "1x1x1": (1, 1, 1),
    "3x5x7": (3, 5, 7),
    "127x33x65": (127, 33, 65),
    "1000x3x2": (1000, 3, 2),
    "7x130x1": (7, 130, 1),
    "0x4x5": (0, 4, 5),
}
DTYPES = {  # (g dtype, a dtype)
    "f32": (torch.float32, torch.float32),
    "f64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16": (torch.float16, torch.float16),
    "f32xf64": (torch.float32, torch.float64),
}


def _inputs(N, O, I, gdt, adt, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, O, generator=gen, dtype=torch.float64).to(gdt)
    a = torch.randn(N, I, generator=gen, dtype=torch.float64).to(adt)
    return g.to(dev), a.to(dev)


def _check(g, a, backend):
    out = ops.sq_matmul(g, a, backend=backend)
    ref = ops.sq_matmul(g, a, backend="torch")
    truth = spec.sq_matmul(g, a)  # the definition, in float64
    assert_reference_close(ref, truth, what="torch sq_matmul")
    assert_kernel_close(out, ref, truth, what=f"{backend} sq_matmul")


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(SHAPES))
@pytest.mark.parametrize("backend", backend_params())
def test_matches_reference(backend, sname, dname):
    dev = require(backend)
    g, a = _inputs(*SHAPES[sname], *DTYPES[dname], dev)
    _check(g, a, backend)


@pytest.mark.parametrize("lay", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", backend_params())
def test_strided_inputs(backend, lay):
    dev = require(backend)
    g, a = _inputs(40, 17, 23, torch.float32, torch.float32, dev, seed=1)
    _check(layout(g, lay), layout(a, lay), backend)
