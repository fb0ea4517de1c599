"""The exact secular-equation solver of the core FIM against torch.linalg.eigh (float64)."""

from __future__ import annotations

import pytest
import torch
from tolerances import EIGH_F64

from fimfast import ops


def _probs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.softmax(torch.randn(64, 10, generator=g, dtype=torch.float64) * 2, -1)
    if kind == "peaked":
        return torch.softmax(torch.randn(32, 10, generator=g, dtype=torch.float64) * 30, -1)
    if kind == "uniform":
        return torch.full((4, 7), 1 / 7, dtype=torch.float64)
    if kind == "ties":
        p = torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.1], [0.4, 0.2, 0.2, 0.1, 0.1],
                          [0.25, 0.25, 0.25, 0.125, 0.125], [0.5, 0.5, 0.0, 0.0, 0.0]],
                         dtype=torch.float64)
        return p
    if kind == "two_classes":
        return torch.softmax(torch.randn(16, 2, generator=g, dtype=torch.float64), -1)
    if kind == "wide":
        return torch.softmax(torch.randn(8, 1000, generator=g, dtype=torch.float64) * 3, -1)
    raise KeyError(kind)


def _dense(p):
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


@pytest.mark.parametrize("kind", ["random", "peaked", "uniform", "ties", "two_classes", "wide"])
def test_secular_solver_matches_eigh(kind):
    p = _probs(kind)
    C = p.shape[1]
    k = min(C - 1, 4)
    lam, V = ops.core_topk(p, k, solver="exact", backend="torch")
    I = _dense(p)
    ev, evec = torch.linalg.eigh(I)
    ref = ev.flip(-1)[:, :k]
    assert torch.allclose(lam, ref, rtol=0, atol=EIGH_F64)
    # eigenpairs: I v = lam v, and orthonormal
    resid = torch.einsum("rij,rkj->rki", I, V) - lam.unsqueeze(-1) * V
    assert float(resid.abs().max()) <= EIGH_F64
    if kind != "ties":  # rows with zero probabilities have a degenerate 0-eigenspace
        gram = V @ V.transpose(1, 2)
        assert float((gram - torch.eye(k, dtype=p.dtype)).abs().max()) <= 1e-8
    # the top-k part of I agrees with eigh's wherever the k-th eigenvalue is separated
    Ik = torch.einsum("rk,rki,rkj->rij", lam, V, V)
    rv = evec.flip(-1)[..., :k]
    Ik_ref = torch.einsum("rk,rik,rjk->rij", ref, rv, rv)
    nxt = ev.flip(-1)[:, k] if k < C else torch.zeros_like(ref[:, 0])
    sep = (ref[:, -1] - nxt) > 1e-6
    if bool(sep.any()):
        assert float((Ik - Ik_ref)[sep].abs().max()) <= 1e-8


def test_interlacing_bounds():
    p = _probs("random")
    lam, _ = ops.core_topk(p, 1)
    q = p.sort(-1).values
    assert bool((lam[:, 0] >= q[:, -2] - 1e-15).all()) and bool((lam[:, 0] <= q[:, -1]).all())
    assert bool((lam[:, 0] >= (p * (1 - p)).max(-1).values - 1e-15).all())
    assert bool((lam[:, 0] <= 1 - (p * p).sum(-1) + 1e-15).all())


def test_float32_input_is_accurate():
    p64 = _probs("random")
    lam32, _ = ops.core_topk(p64.float(), 3)
    lam64, _ = ops.core_topk(p64, 3)
    assert lam32.dtype == torch.float32
    assert torch.allclose(lam32.double(), lam64, atol=1e-6)


def test_power_solver_converges_on_separated_spectrum():
    p = _probs("random")
    lam_e, V_e = ops.core_topk(p, 2, solver="exact")
    lam_p, V_p = ops.core_topk(p, 2, solver="power", iters=500)
    gap = (lam_e[:, 0] - lam_e[:, 1]) / lam_e[:, 0]
    ok = gap > 0.2  # power iteration converges at rate lam2/lam1
    assert torch.allclose(lam_p[ok, 0], lam_e[ok, 0], rtol=1e-8)


@pytest.mark.parametrize("k", [0, 10])
def test_bad_k_is_refused(k):
    with pytest.raises(ValueError, match="k must be in"):
        ops.core_topk(_probs("random"), k)
