"""lm_head_probe: the chunked fused op against the unfused composition, on every backend."""

from __future__ import annotations

import pytest
import torch
from kernel_parity import rel_err
from largest_alloc import LargestAlloc
from op_backends import backend_params, require
from tolerances import LM_HEAD_ULPS

from fimfast import ops
from fimfast.ops.lm_head import CHUNK_ELEMS

SEED = 0x1234_5678_9ABC_DEF0
OFFSET = 2**33 + 5  # a high counter word != 0, not a multiple of 32
DTYPES = {"f32": torch.float32, "f64": torch.float64}
# (R, V, d, row_chunk): one row, three classes, a row chunk that does not divide R
SHAPES = {
    "R1xV3": (1, 3, 4, None),
    "127x513-chunk32": (127, 513, 16, 32),
    "127x513-default": (127, 513, 16, None),
    "5x40-chunk1": (5, 40, 8, 1),
}
MODES = ("hutchinson", "sqrt", "dg")


def _interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def _inputs(R, V, d, dtype, bias, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, d, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    return h.to(device), W.to(device), None if b is None else b.to(device)


def unfused(h, W, b, mode, seed=SEED, offset=OFFSET):
    """Full (R, V) logits, the factor of one call on all rows, then the three products."""
    z = h @ W.t() if b is None else h @ W.t() + b
    # sqrt's factor through log_softmax equals hutchinson's formula for the same signs
    u = ops.probe_logit_grad(z, "hutchinson" if mode == "sqrt" else mode, seed, offset, 1,
                             backend="torch")[0]
    return u @ W, u.t() @ h, None if b is None else u.sum(0)


def _assert_close(got, ref, dtype, what):
    tol = LM_HEAD_ULPS * torch.finfo(dtype).eps
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for name, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g.shape == r.shape, f"{what}: {name} shape {tuple(g.shape)} != {tuple(r.shape)}"
        err = rel_err(g, r)
        assert err <= tol, f"{what}: {name} error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_reference_equals_unfused_composition(dtype, shape, mode, bias):
    R, V, d, chunk = SHAPES[shape]
    dt = DTYPES[dtype]
    h, W, b = _inputs(R, V, d, dt, bias)
    got = ops.lm_head_probe(h, W, b, mode, SEED, OFFSET, row_chunk=chunk, backend="torch")
    assert got[0].dtype == dt and got[1].dtype == dt
    _assert_close(got, unfused(h, W, b, mode), dt, f"{dtype} {shape} {mode}")


# (R, V, d, bias, dtype): the fused Triton kernels' tile edges (16 rows, 64 classes) cut every one
BACKEND_CASES = {
    "127x513-f32": (127, 513, 16, True, torch.float32),
    "1x3-f64": (1, 3, 4, True, torch.float64),
    "33x130x20-nobias-f32": (33, 130, 20, False, torch.float32),
    "17x70-f64": (17, 70, 8, True, torch.float64),
    "3x20x300-f32": (3, 20, 300, True, torch.float32),  # d > MAX_D: Triton's composite path
}


@pytest.mark.parametrize("case", list(BACKEND_CASES), ids=list(BACKEND_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", backend_params())
def test_backends_equal_the_reference(backend, mode, case):
    dev = require(backend)
    if _interpreted(backend) and case == "127x513-f32" and mode != "hutchinson":
        pytest.skip("the Triton interpreter runs the 127-row case for hutchinson only (CPU time)")
    R, V, d, bias, dt = BACKEND_CASES[case]
    h, W, b = _inputs(R, V, d, dt, bias, dev)
    got = ops.lm_head_probe(h, W, b, mode, SEED, OFFSET, row_chunk=32, backend=backend)
    ref = ops.lm_head_probe(h, W, b, mode, SEED, OFFSET, row_chunk=32, backend="torch")
    _assert_close(got, ref, dt, f"{backend} {mode} {case}")
    # the fused kernels write whole tiles into padded buffers: the results are exact-size tensors
    assert all(g is None or g.is_contiguous() for g in got), f"{backend} {mode} {case}"


def test_probe_offsets_follow_the_unfused_counters():
    """Probe ``s`` over ``R`` rows at ``offset + s*R*V`` is row block ``s`` of one S-probe call."""
    R, V, d, S = 6, 37, 5, 3
    h, W, b = _inputs(R, V, d, torch.float64, False)
    z = h @ W.t()
    u_all = ops.probe_logit_grad(z, "hutchinson", SEED, OFFSET, S, backend="torch")  # (S, R, V)
    for s in range(S):
        gh, gw, _ = ops.lm_head_probe(h, W, None, "hutchinson", SEED, OFFSET + s * R * V,
                                      row_chunk=4, backend="torch")
        assert rel_err(gh, u_all[s] @ W) < 1e-13
        assert rel_err(gw, u_all[s].t() @ h) < 1e-13


def test_low_precision_inputs_keep_float32_gradients():
    h, W, b = _inputs(9, 50, 8, torch.bfloat16, True)
    gh, gw, gb = ops.lm_head_probe(h, W, b, "hutchinson", SEED, OFFSET, row_chunk=4)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    ref = unfused(h.float(), W.float(), b.float(), "hutchinson")
    assert rel_err(gw, ref[1]) <= LM_HEAD_ULPS * torch.finfo(torch.float32).eps
    assert rel_err(gh, ref[0]) <= 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("backend", ["torch", *backend_params(("cpp",))])
def test_no_rows_by_vocab_tensor_is_allocated(backend):
    """V = 50k, 64 rows: the largest storage of the op is one row chunk, not (R, V)."""
    if backend != "torch":
        require(backend)
    R, V, d = 64, 50_000, 32
    h, W, _ = _inputs(R, V, d, torch.float32, False)
    rows_by_vocab = R * V * 4
    with LargestAlloc() as fused:
        ops.lm_head_probe(h, W, None, "hutchinson", SEED, OFFSET, backend=backend)
    assert fused.bytes < rows_by_vocab, (fused.bytes, fused.op, fused.shape)
    assert fused.bytes <= 1.1 * CHUNK_ELEMS * 4, (fused.bytes, fused.op, fused.shape)
    with LargestAlloc() as plain:  # the probe can fail: the unfused composition does allocate it
        unfused(h, W, None, "hutchinson")
    assert plain.bytes >= rows_by_vocab


BAD = {
    "hidden-1d": (lambda h, W, b: (h[0], W, b, "hutchinson", None), ValueError, "2-D"),
    "d-mismatch": (lambda h, W, b: (h[:, :3], W, b, "hutchinson", None), ValueError, "agree on d"),
    "bias-shape": (lambda h, W, b: (h, W, b[:2], "hutchinson", None), ValueError, "bias must be"),
    "mode": (lambda h, W, b: (h, W, b, "rankk", None), ValueError, "mode must be one of"),
    "row-chunk": (lambda h, W, b: (h, W, b, "hutchinson", 0), ValueError, "row_chunk must be"),
    "not-a-tensor": (lambda h, W, b: ([1.0], W, b, "hutchinson", None), TypeError, "hidden must"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_raise_naming_them(case):
    make, exc, msg = BAD[case]
    h, W, b = _inputs(4, 7, 5, torch.float32, True)
    hh, WW, bb, mode, chunk = make(h, W, b)
    with pytest.raises(exc, match=msg):
        ops.lm_head_probe(hh, WW, bb, mode, SEED, OFFSET, row_chunk=chunk)


@pytest.mark.parametrize("V,lead", [(40, 3), (130, 129)], ids=["V40-lead3", "V130-lead-last"])
@pytest.mark.parametrize("mode", ["hutchinson", "sqrt"])
@pytest.mark.parametrize("backend", ["torch", *backend_params()])
def test_confident_head(backend, mode, V, lead):
    """A float32 head whose every row leads in class ``lead`` by about 25 (``1 - max p`` a few
    ulps of 1; on the 130-class head the leading class sits in the last tile of the fused kernels,
    after the row's running max): the products equal the float64 ones, whose factor resolves
    ``1 - p``, to float32 rounding of the logits. Formed as ``w - p sum(w)`` the leading class's
    entry kept no relative accuracy (the weight row of that class was off by about 1e-3)."""
    dev = require(backend) if backend != "torch" else torch.device("cpu")
    h, W, b = _inputs(17, V, 8, torch.float32, True, seed=5)
    W, b = W * 0.4, b * 0.4
    b[lead] += 25.0
    z = (h.double() @ W.double().t() + b.double())
    top = z.topk(2, -1).values
    assert bool(((top[:, 0] - top[:, 1]) > 18).all()), "every row must be confident"
    ref = unfused(h.double(), W.double(), b.double(), mode)  # float64: 1 - p resolved
    got = ops.lm_head_probe(h.to(dev), W.to(dev), b.to(dev), mode, SEED, OFFSET, backend=backend)
    for name, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), got, ref):
        assert float(r.abs().max()) > 0, f"{name}: a zero oracle"
        g = g.double().cpu()
        if name == "grad_weight":  # each class's row relative to itself (the leading one's too)
            err = float(((g - r).abs().amax(1) / r.abs().amax(1)).max())
        else:
            err = rel_err(g, r)
        assert err <= 1e-4, f"{backend} {mode} V={V}: {name} error {err:.3g}"
