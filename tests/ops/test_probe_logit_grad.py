"""probe_logit_grad: every kernel backend against the torch reference, mode by mode, both against
the float64 definition of every mode (tests/ops/spec.py: hand softmax, independent generator)."""

from __future__ import annotations

import numpy as np
import pytest
import spec
import torch
from kernel_parity import assert_kernel_close, assert_reference_close, layout, rel_err
from op_backends import backend_params, require
from tolerances import KERNEL_SLACK_ULPS, MC_BOUNDARY

from fimfast import ops
from fimfast.ops.registry import BackendUnavailableError

SEED = 0x1234_5678_9ABC_DEF0  # both 32-bit halves of the seed matter
OFFSET = 2**33 + 5  # a high counter word != 0, not a multiple of 32
SIGMA2 = 2.0
S = 2
DTYPES = {
    "f32": torch.float32,
    "f64": torch.float64,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
}
SHAPES = {"1x3": (1, 3), "127x513": (127, 513), "5x8192": (5, 8192)}
# the Triton interpreter runs programs one after another in Python: there the 127-row shape runs
# for two (mode, dtype) pairs and the 8192-class one in f32 and bf16 (everything on a GPU)
_INTERP_127 = {("hutchinson", "f32"), ("mc", "bf16")}
_INTERP_8192 = ("f32", "bf16")


def _interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def _inputs(R, C, dtype, mode, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, C, (R,), generator=g)
    eig = None
    if mode == "rankk":  # any (lam, V) tests the mix; some lam < 0 test the clamp at 0
        dt = ops.compute_dtype(dtype)
        k = min(3, C)
        lam = torch.rand(R, k, generator=g, dtype=torch.float64) - 0.2
        vec = torch.randn(R, k, C, generator=g, dtype=torch.float64)
        eig = (lam.to(dt).to(device), vec.to(dt).to(device))
    return z.to(device), labels.to(device), eig


def _call(z, mode, labels, eig, backend, num_probes=S, offset=OFFSET):
    return ops.probe_logit_grad(
        z, mode, SEED, offset, num_probes, labels=labels, eig=eig, sigma2=SIGMA2, backend=backend
    )


def _check(z, mode, labels, eig, backend):
    out = _call(z, mode, labels, eig, backend)
    ref = _call(z, mode, labels, eig, "torch")
    z64 = z.to(torch.float64)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    if mode == "mc":
        _check_mc(z64, labels, out, ref)
        return
    truth = spec.probe_logit_grad(z, mode, SEED, OFFSET, S, labels=labels, eig=eig, sigma2=SIGMA2)
    assert_reference_close(ref, truth, what=f"torch {mode}")
    assert_kernel_close(out, ref, truth, what=f"{backend} {mode}")


def _check_mc(z64, labels, out, ref):
    """The labels of the definition (inverse CDF of the float64 softmax at the spec's uniforms),
    for the reference and the kernel, except where u sits on a CDF step; e_y - p to rounding."""
    R, C = z64.shape
    truth = spec.probe_logit_grad(z64, "mc", SEED, OFFSET, S)
    yt = truth.argmax(-1)
    u = torch.from_numpy(spec.uniforms(SEED, OFFSET, S * R).reshape(S, R))
    cdf = torch.from_numpy(np.cumsum(spec.softmax(z64.cpu().numpy()), -1))
    yk, yr = out.argmax(-1).cpu(), ref.argmax(-1).cpu()
    for y, who in ((yr, "torch"), (yk, "kernel")):
        for s, r in (y != yt).nonzero().tolist():
            step = float(cdf[r, min(int(y[s, r]), int(yt[s, r]))])
            assert abs(step - float(u[s, r])) <= MC_BOUNDARY, (
                f"{who} mc label {int(y[s, r])} != {int(yt[s, r])} of the definition")
    p64 = torch.from_numpy(spec.softmax(z64.cpu().numpy()))
    onehot = torch.nn.functional.one_hot
    truth_k = onehot(yk.cpu(), C).double() - p64.cpu()
    truth_r = onehot(yr.cpu(), C).double() - p64.cpu()
    ek, er = rel_err(out, truth_k), rel_err(ref, truth_r)
    # e_y - p is formed next to the one-hot's 1: absolute rounding of a few ulps
    abs_err = float((ref.cpu().double() - truth_r).abs().max())
    assert abs_err <= KERNEL_SLACK_ULPS * torch.finfo(ref.dtype).eps, abs_err
    assert ek <= er + KERNEL_SLACK_ULPS * torch.finfo(out.dtype).eps, (ek, er)


def _cases():
    for b in ("cpp", "triton", "cuda"):
        marks = [pytest.mark.triton] if b == "triton" else []
        for mode in ops.PROBE_MODES:
            for sname, shape in SHAPES.items():
                for dname in DTYPES:
                    if _interpreted(b) and (
                        (sname == "127x513" and (mode, dname) not in _INTERP_127)
                        or (sname == "5x8192" and dname not in _INTERP_8192)
                    ):
                        continue
                    yield pytest.param(b, mode, shape, dname, marks=marks,
                                       id=f"{b}-{mode}-{sname}-{dname}")


@pytest.mark.parametrize("backend,mode,shape,dname", list(_cases()))
def test_matches_reference(backend, mode, shape, dname):
    dev = require(backend)
    z, labels, eig = _inputs(*shape, DTYPES[dname], mode, dev)
    _check(z, mode, labels, eig, backend)


@pytest.mark.parametrize("lay", ["transposed", "sliced"])
@pytest.mark.parametrize("mode", ["hutchinson", "mc", "bernoulli", "empirical"])
@pytest.mark.parametrize("backend", backend_params())
def test_strided_logits(backend, mode, lay):
    dev = require(backend)
    z, labels, eig = _inputs(7, 300, torch.float32, mode, dev, seed=1)
    _check(layout(z, lay), mode, labels, eig, backend)


@pytest.mark.parametrize("mode", ["dg", "sqrt", "gaussian", "bernoulli", "hutchinson"])
@pytest.mark.parametrize("backend", backend_params())
def test_signs_match_reference(backend, mode):
    """The probes are the reference's sign for sign (hutchinson: where |dz| is not rounding)."""
    dev = require(backend)
    z, labels, eig = _inputs(33, 257, torch.float32, mode, dev, seed=2)
    out = _call(z, mode, labels, eig, backend)
    ref = _call(z, mode, labels, eig, "torch")
    if mode == "hutchinson":
        keep = ref.abs() > 1e-4 * ref.abs().max()
        assert torch.equal(torch.sign(out[keep]), torch.sign(ref[keep]))
    else:
        assert torch.equal(torch.sign(out), torch.sign(ref))


@pytest.mark.parametrize("mode", ["hutchinson", "gaussian", "mc", "rankk"])
@pytest.mark.parametrize("backend", backend_params())
def test_probe_s_is_call_at_advanced_offset(backend, mode):
    """Probe s of a call equals probe 0 of a call whose offset is advanced by s*R*C (s*R*k for
    rankk, s*R for mc): the counter layout of the contract."""
    dev = require(backend)
    R, C = 4, 37
    z, labels, eig = _inputs(R, C, torch.float32, mode, dev, seed=3)
    out = _call(z, mode, labels, eig, backend, num_probes=3, offset=1000)
    per = {"mc": R, "rankk": R * 3}.get(mode, R * C)
    for s in range(3):
        one = _call(z, mode, labels, eig, backend, num_probes=1, offset=1000 + s * per)
        assert torch.equal(out[s], one[0])


@pytest.mark.triton
@pytest.mark.parametrize("mode", ops.PROBE_MODES)
def test_triton_long_rows(mode, monkeypatch):
    """Rows longer than one register block take the column-block loop (online softmax)."""
    dev = require("triton")
    from fimfast.ops.triton import probe_logit_grad as mod

    monkeypatch.setattr(mod, "MAX_ONE_BLOCK", 256)
    monkeypatch.setattr(mod, "_LOOP_BLOCK", 128)
    z, labels, eig = _inputs(3, 700, torch.float32, mode, dev, seed=4)
    _check(z, mode, labels, eig, "triton")


@pytest.mark.parametrize("backend", backend_params())
def test_empty_rows(backend):
    dev = require(backend)
    z = torch.zeros(0, 5, device=dev)
    out = _call(z, "hutchinson", None, None, backend)
    assert out.shape == (S, 0, 5) and out.dtype == torch.float32


def test_cpp_rejects_labels_out_of_range():
    require("cpp")
    z = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="labels must be in"):
        _call(z, "empirical", torch.tensor([0, 4]), None, "cpp")


def test_unavailable_backend_is_an_error_with_reason(monkeypatch):
    monkeypatch.setenv("FIMFAST_BACKEND", "auto")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        _call(torch.zeros(2, 3), "dg", None, None, "cuda")


@pytest.mark.parametrize(
    "backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.triton)]
)
def test_bernoulli_probes_of_saturated_logits(backend):
    """sqrt(s (1 - s)) in both tails: |dz| = 1 / (2 cosh(z / 2)) for z = +-17, +-40."""
    require(backend)
    z = torch.tensor([[17.0, -17.0, 40.0, -40.0, 0.0]])
    got = ops.probe_logit_grad(z, "bernoulli", 3, 0, 1, backend=backend).abs()[0, 0].double()
    want = 0.5 / torch.cosh(0.5 * z[0].double())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.triton
def test_triton_bernoulli_long_rows_of_saturated_logits(monkeypatch):
    """The column-block loop of the Triton kernel uses the same tail-exact amplitude."""
    dev = require("triton")
    from fimfast.ops.triton import probe_logit_grad as mod

    monkeypatch.setattr(mod, "MAX_ONE_BLOCK", 2)
    monkeypatch.setattr(mod, "_LOOP_BLOCK", 2)
    z = torch.tensor([[17.0, -17.0, 40.0, -40.0, 0.0]], device=dev)
    got = ops.probe_logit_grad(z, "bernoulli", 3, 0, 1, backend="triton").abs()[0, 0].double()
    want = 0.5 / torch.cosh(0.5 * z[0].double().cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=0)
