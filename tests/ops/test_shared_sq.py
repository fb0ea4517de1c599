"""shared_sq: every kernel backend against the torch reference, both against the
float64 definition (tests/ops/spec.py)."""

from __future__ import annotations

import pytest
import spec
import torch
from kernel_parity import assert_kernel_close, assert_reference_close
from op_backends import backend_params, require

from fimfast import ops

SHAPES = {  # (N, T, O, I)
    "1x1x1x1": (1, 1, 1, 1),
    "2x3x5x7": (2, 3, 5, 7),
    "9x17x33x65": (9, 17, 33, 65),
    "4x50x3x2": (4, 50, 3, 2),
    "3x1x70x9": (3, 1, 70, 9),
    "6x2x70x67": (6, 2, 70, 67),  # O*I over the CPU kernel's block and parallel grain
    "0x2x3x4": (0, 2, 3, 4),
    # the fused float32 CPU kernel (csrc/cpu/shared_sq_fused.cpp): tiles of 3 and 4 rows, 2, 3
    # and 4 vectors of columns with a masked last one, samples in several passes (A over 512 KiB);
    # the transposed products (64 or more outputs, fewer inputs: also "3x1x70x9"), and the GEMM
    # (fewer than 64 of both, more than 8 positions); past its longest sum (32 positions)
    "5x20x80x20": (5, 20, 80, 20),
    "3x12x20x30": (3, 12, 20, 30),
    "5x4x7x40": (5, 4, 7, 40),
    "3x5x11x30": (3, 5, 11, 30),
    "4x32x6x131": (4, 32, 6, 131),
    "40x32x5x130": (40, 32, 5, 130),
    "2x33x6x20": (2, 33, 6, 20),
}
DTYPES = {
    "f32": (torch.float32, torch.float32),
    "f64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16": (torch.float16, torch.float16),
    "f64xf32": (torch.float64, torch.float32),
}


def _inputs(N, T, O, I, gdt, adt, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(N, T, O, generator=gen, dtype=torch.float64).to(gdt)
    A = torch.randn(N, T, I, generator=gen, dtype=torch.float64).to(adt)
    return G.to(dev), A.to(dev)


def _check(G, A, backend):
    out = ops.shared_sq(G, A, backend=backend)
    ref = ops.shared_sq(G, A, backend="torch")
    truth = spec.shared_sq(G, A)  # the definition, in float64
    assert_reference_close(ref, truth, what="torch shared_sq")
    assert_kernel_close(out, ref, truth, what=f"{backend} shared_sq")


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("sname", list(SHAPES))
@pytest.mark.parametrize("backend", backend_params())
def test_matches_reference(backend, sname, dname):
    dev = require(backend)
    G, A = _inputs(*SHAPES[sname], *DTYPES[dname], dev)
    _check(G, A, backend)


@pytest.mark.parametrize("lay", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", backend_params())
def test_strided_inputs(backend, lay):
    """G and A as views: (N, O, T) storage transposed, or every other position of a longer T."""
    dev = require(backend)
    G, A = _inputs(5, 12, 9, 11, torch.float32, torch.float32, dev, seed=1)
    if lay == "transposed":
        G = G.transpose(1, 2).contiguous().transpose(1, 2)
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        G = torch.cat([G, G], 1)[:, ::2]
        A = torch.cat([A, A], 1)[:, ::2]
    _check(G, A, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_strided_g_contiguous_a(backend):
    """G stored (N, O, T) (a convolution's output gradient) against a contiguous A with 64 or
    more columns: the fused CPU kernel's broadcasts of G at stride T."""
    dev = require(backend)
    G, A = _inputs(4, 6, 10, 70, torch.float32, torch.float32, dev, seed=2)
    _check(G.transpose(1, 2).contiguous().transpose(1, 2), A, backend)
