"""accumulate_: every kernel backend against the torch reference (multi-tensor, in place),
both against the float64 definition (tests/ops/spec.py)."""

from __future__ import annotations

import pytest
import spec
import torch
from kernel_parity import assert_kernel_close, assert_reference_close
from op_backends import backend_params, require

from fimfast import ops

# (state dtype, grad dtype) of each tensor in one call: mixed dtypes, shapes and an empty tensor
PANEL = [
    ((7,), torch.float32, torch.float32),
    ((3, 4), torch.float32, torch.bfloat16),
    ((10_000,), torch.float32, torch.float16),
    ((5, 1, 3), torch.float64, torch.float64),
    ((0, 3), torch.float32, torch.float32),
    ((2, 9000), torch.float64, torch.float32),
    ((1,), torch.float32, torch.float64),
]


def _panel(dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    states, grads = [], []
    for shape, sdt, gdt in PANEL:
        states.append(torch.rand(shape, generator=gen, dtype=torch.float64).to(sdt).to(dev))
        grads.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(gdt).to(dev))
    return states, grads


@pytest.mark.parametrize("mode,beta,scale", [("sum", 0.0, 1.0), ("sum", 0.0, 0.25),
                                             ("ema", 0.9, 1.0), ("ema", 0.5, 3.0)],
                         ids=["sum", "sum-scaled", "ema", "ema-scaled"])
@pytest.mark.parametrize("backend", backend_params())
def test_matches_reference(backend, mode, beta, scale):
    dev = require(backend)
    states, grads = _panel(dev)
    ptrs = [s.data_ptr() for s in states]
    ref = [s.clone() for s in states]
    truth = [spec.accumulate(s, g, mode, beta, scale) for s, g in zip(states, grads)]
    ops.accumulate_(states, grads, mode, beta, scale, backend=backend)
    ops.accumulate_(ref, grads, mode, beta, scale, backend="torch")
    assert [s.data_ptr() for s in states] == ptrs  # in place
    for i, (s, r, t) in enumerate(zip(states, ref, truth)):
        assert_reference_close(r, t, what=f"torch accumulate_ tensor {i}")
        assert_kernel_close(s, r, t, what=f"{backend} accumulate_ tensor {i}")


@pytest.mark.parametrize("backend", backend_params())
def test_strided_states_and_grads(backend):
    dev = require(backend)
    base = torch.rand(6, 8, device=dev)
    states = [base.t(), torch.rand(20, device=dev)[::2]]  # non-contiguous views, updated in place
    grads = [torch.randn(6, 8, device=dev).t(), torch.randn(10, 2, device=dev)[:, 0]]
    ref = [s.clone() for s in states]
    ops.accumulate_(states, grads, "ema", 0.8, 2.0, backend=backend)
    truth = [spec.accumulate(s, g, "ema", 0.8, 2.0) for s, g in zip(ref, grads)]
    ops.accumulate_(ref, grads, "ema", 0.8, 2.0, backend="torch")
    for s, r, t in zip(states, ref, truth):
        assert_reference_close(r, t, what="torch accumulate_")
        assert_kernel_close(s, r, t, what=f"{backend} accumulate_")
    torch.testing.assert_close(base.t(), states[0])  # the view's storage holds the result


@pytest.mark.parametrize("backend", backend_params())
def test_bad_input_leaves_states_untouched(backend):
    dev = require(backend)
    states, grads = _panel(dev)
    before = [s.clone() for s in states]
    grads[3] = torch.zeros(2, 2, device=dev)
    with pytest.raises(ValueError, match="grads\\[3\\]"):
        ops.accumulate_(states, grads, backend=backend)
    for s, b in zip(states, before):
        assert torch.equal(s, b)
