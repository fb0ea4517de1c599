"""core_topk: every kernel backend against the torch reference (exact and power solvers), and both
against numpy's eigendecomposition of diag(p) - p p^T formed in the test (tests/ops/spec.py)."""

from __future__ import annotations

import pytest
import spec
import torch
from kernel_parity import assert_kernel_close
from op_backends import backend_params, require
from tolerances import EIG_ERR_FACTOR, KERNEL_SLACK_ULPS

from fimfast import ops
from fimfast.ops.torch_ref import fix_signs

DTYPES = {"f32": torch.float32, "f64": torch.float64}


def _probs(kind: str) -> tuple[torch.Tensor, int]:
    """(p (R, C) float64, k) of one family of rows."""
    g = torch.Generator().manual_seed(5)
    if kind == "random":
        return torch.softmax(torch.randn(13, 257, generator=g, dtype=torch.float64) * 3, -1), 4
    if kind == "peaked":  # probabilities spanning hundreds of decades
        return torch.softmax(torch.randn(9, 40, generator=g, dtype=torch.float64) * 40, -1), 3
    if kind == "ties":
        p = torch.tensor(
            [
                [0.3, 0.3, 0.2, 0.1, 0.1],
                [0.4, 0.2, 0.2, 0.1, 0.1],
                [0.25, 0.25, 0.25, 0.125, 0.125],
                [0.1, 0.2, 0.2, 0.2, 0.3],
            ],
            dtype=torch.float64,
        )
        return p, 4
    if kind == "zeros":
        return torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 0.2, 0.1]],
                            dtype=torch.float64), 4
    if kind == "uniform":
        return torch.full((3, 6), 1 / 6, dtype=torch.float64), 5
    if kind == "two_classes":
        return torch.softmax(torch.randn(16, 2, generator=g, dtype=torch.float64), -1), 1
    if kind == "1x3":
        return torch.softmax(torch.randn(1, 3, generator=g, dtype=torch.float64), -1), 2
    if kind == "wide":
        return torch.softmax(torch.randn(3, 8192, generator=g, dtype=torch.float64) * 3, -1), 2
    raise KeyError(kind)


KINDS = ["random", "peaked", "ties", "zeros", "uniform", "two_classes", "1x3", "wide"]


def _check_definition(p, lam, vec, k, solver, what):
    """(lam, vec) against M = diag(p) - p p^T formed here in float64 (||M|| <= 1, so absolute
    errors): orthonormal rows; exact: the top-k eigenvalues of numpy's eigh (C <= 512; above,
    they interlace with the sorted probabilities) and residuals
    |M v - lam v| of a few ulps (by Davis-Kahan this pins every vector of a simple eigenvalue,
    and the eigenspace of a repeated one); power: lam is the Rayleigh quotient v^T M v."""
    tol = KERNEL_SLACK_ULPS * torch.finfo(lam.dtype).eps
    p64 = p.detach().to("cpu", torch.float64)
    lam64, V = lam.detach().to("cpu", torch.float64), vec.detach().to("cpu", torch.float64)
    # orthogonality of vectors from the secular equation degrades as 1 / (relative distance of
    # the eigenvalue to the nearest probability, a pole): measured 0.01-0.2 ulps times that factor
    dist = (p64.unsqueeze(1) - lam64.unsqueeze(-1)).abs().amin(-1) / lam64.abs().clamp_min(1e-300)
    cond = 1 / dist.amin(-1).clamp(1e-300, 1.0)  # (R,)
    gram = torch.einsum("rjc,ric->rji", V, V)
    orth = (gram - torch.eye(k, dtype=torch.float64)).abs().amax((1, 2))
    worst = float((orth / (tol * cond)).max())
    assert worst <= 1, f"{what}: |V V^T - I| up to {worst:.3g} x its bound {tol:.3g} x cond"
    # M v = p * v - p (p . v), without the C x C matrix
    MV = p64.unsqueeze(1) * V - p64.unsqueeze(1) * torch.einsum("rc,rjc->rj", p64, V).unsqueeze(-1)
    if solver == "power":
        rq = torch.einsum("rjc,rjc->rj", V, MV)
        err = float((rq - lam64).abs().max())
        assert err <= tol, f"{what}: eigenvalue != Rayleigh quotient by {err:.3g}"
        return
    if p.shape[-1] <= 512:
        lam_np, _ = spec.core_eigh(p)
        err = float((lam64 - torch.from_numpy(lam_np[:, :k])).abs().max())
        assert err <= tol, f"{what}: eigenvalues off numpy's eigh by {err:.3g} > {tol:.3g}"
    else:  # eigh of C x C is too slow: with the residuals below, interlacing with the sorted p
        # (p_(j+1) <= lam_j <= p_(j)) makes them the top k
        ps = p64.sort(-1, descending=True).values
        assert bool((lam64 <= ps[:, :k] + tol).all() and (lam64 >= ps[:, 1 : k + 1] - tol).all())
    res = float((MV - lam64.unsqueeze(-1) * V).abs().max())
    assert res <= tol, f"{what}: residual |M v - lam v| = {res:.3g} > {tol:.3g}"


def _check(p, k, solver, backend, iters=30):
    lam, vec = ops.core_topk(p, k, solver, iters, backend=backend)
    lam_r, vec_r = ops.core_topk(p, k, solver, iters, backend="torch")
    lam_t, vec_t = ops.core_topk(p.double(), k, solver, iters, backend="torch")
    what = f"{backend} {solver}"
    _check_definition(p, lam_r, vec_r, k, solver, f"torch {solver}")
    _check_definition(p, lam, vec, k, solver, what)
    assert lam.shape == lam_r.shape and vec.shape == vec_r.shape
    assert vec.is_contiguous() and lam.is_contiguous()
    assert_kernel_close(lam, lam_r, lam_t, what=what + " eigenvalues")
    assert_kernel_close(vec, vec_r, vec_t, factor=EIG_ERR_FACTOR, what=what + " eigenvectors")
    # the conventions of the contract: descending, unit norm, largest entry positive
    assert bool((lam[:, 1:] <= lam[:, :-1] + 1e-6).all())
    norms = vec.double().norm(dim=-1)
    assert bool(((norms - 1).abs() < 1e-5).all())
    assert torch.equal(fix_signs(vec), vec)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", backend_params())
def test_exact_matches_reference(backend, kind, dname):
    dev = require(backend)
    p, k = _probs(kind)
    _check(p.to(DTYPES[dname]).to(dev), k, "exact", backend)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("kind", ["random", "ties", "1x3"])
@pytest.mark.parametrize("backend", backend_params())
def test_power_matches_reference(backend, kind, dname):
    dev = require(backend)
    p, k = _probs(kind)
    if kind == "random":  # the interpreter runs 30 iterations of k vectors per row in Python
        p, k = p[:5, :64] / p[:5, :64].sum(-1, keepdim=True), 3
    _check(p.to(DTYPES[dname]).to(dev), k, "power", backend, iters=12)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", backend_params())
def test_strided_probabilities(backend, layout):
    dev = require(backend)
    p, k = _probs("random")
    p = p[:6].float()
    if layout == "transposed":
        q = p.t().contiguous().t()
    else:
        wide = torch.zeros(6, 2 * p.shape[1], dtype=p.dtype)
        wide[:, ::2] = p
        q = wide[:, ::2]
    _check(q.to(dev), k, "exact", backend)


@pytest.mark.triton
def test_triton_falls_back_beyond_its_block(monkeypatch):
    """Rows longer than MAX_C (and power with k > MAX_K) run the reference: same contract."""
    dev = require("triton")
    from fimfast.ops.triton import core_topk as mod

    monkeypatch.setattr(mod, "MAX_C", 16)
    p, k = _probs("random")
    p = p[:2].float().to(dev)
    lam, vec = ops.core_topk(p, k, backend="triton")
    lam_r, vec_r = ops.core_topk(p, k, backend="torch")
    assert torch.equal(lam, lam_r) and torch.equal(vec, vec_r)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_rows(backend):
    dev = require(backend)
    lam, vec = ops.core_topk(torch.zeros(0, 4, device=dev), 2, backend=backend)
    assert lam.shape == (0, 2) and vec.shape == (0, 2, 4)
