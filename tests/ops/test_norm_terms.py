"""``norm_terms`` (the gradients of a norm's weight and bias per column and sample): the cpp
kernel against its torch reference on every layout and dtype, the fallback of an extension built
before the op, and the LayerNorm rule on it against the float64 oracle."""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import classifier_case, make_case
from op_backends import require
from oracle import oracle_flat, rel_error, row_jacobians
from tolerances import DET_REL_F32, DET_REL_F64
from torch import nn

from fimfast import DiagFisher
from fimfast.ops import norm_terms as nt


def _layouts(M: int, dtype: torch.dtype):
    """``(name, G, X)``: contiguous, G with columns innermost, G and X with a feature stride 2,
    X with samples innermost."""
    g = torch.Generator().manual_seed(M)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    N, T, D = 5, 7, 19
    G, X = rnd(M, N, T, D), rnd(N, T, D)
    yield "contiguous", G, X
    yield "columns_inner", rnd(N, T, D, M).permute(3, 0, 1, 2), X
    yield "feature_stride", rnd(M, N, T, 2 * D)[..., ::2], rnd(N, T, 2 * D)[..., ::2]
    yield "samples_inner", G, rnd(T, D, N).permute(2, 0, 1)
    yield "positions_sliced", rnd(M, N, 2 * T, D)[:, :, 1::2], rnd(N, 2 * T, D)[:, ::2]
    # a channel norm's (N, C, L) seen as (N, L, C): positions contiguous (the kernel's dot
    # products), a short row and one of several blocks of 256 with a remainder
    for L in (T, 600):
        yield f"positions_inner_{L}", rnd(M, N, D, L).transpose(2, 3), rnd(N, D, L).transpose(1, 2)
    yield "positions_inner_X_only", G, rnd(N, D, T).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("M", [1, 3])
def test_cpp_matches_torch_reference(M, dtype):
    require("cpp")
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                         "atol": 1e-12}
    for (name, G, X), eps in itertools.product(_layouts(M, dtype), (None, 1e-5, 0.5)):
        if eps is not None:  # a LayerNorm's input: rows off centre, of another scale
            X = X * 3.0 + 1.5
        W, B = nt.norm_terms(G, X, eps, backend="cpp")
        Wr, Br = nt.norm_terms_torch(G.double(), X.double(), eps)
        assert W.dtype == dtype and W.shape == (M, *X.shape[:1], X.shape[2]), name
        torch.testing.assert_close(W.double(), Wr, **tol, msg=f"{name} eps={eps}")
        torch.testing.assert_close(B.double(), Br, **tol, msg=f"{name} eps={eps}")


def test_cpp_empty_and_checks():
    require("cpp")
    W, B = nt.norm_terms(torch.randn(2, 3, 0, 4), torch.randn(3, 0, 4), backend="cpp")
    assert W.shape == B.shape == (2, 3, 4) and not W.any() and not B.any()
    with pytest.raises(ValueError, match="must be"):
        nt.norm_terms(torch.randn(2, 3, 4, 5), torch.randn(3, 4, 6))
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        torch.ops.fimfast.norm_terms(torch.randn(1, 2, 3, 4), torch.randn(2, 3, 4).double(), None)


def test_opcheck():
    require("cpp")
    import fimfast.ops.cpp  # noqa: F401  (the extension and its fake implementations)

    torch.library.opcheck(torch.ops.fimfast.norm_terms,
                          (torch.randn(2, 3, 4, 5), torch.randn(3, 4, 5), None))
    torch.library.opcheck(torch.ops.fimfast.norm_terms,
                          (torch.randn(2, 3, 4, 5).double(), torch.randn(3, 4, 5).double(), 0.1))


def test_extension_without_the_op_runs_the_reference(monkeypatch):
    monkeypatch.setattr(nt, "_OP", "no_such_op")
    G, X = torch.randn(2, 3, 4, 5), torch.randn(3, 4, 5)
    W, B = nt.norm_terms_cpp(G, X)
    torch.testing.assert_close(W, (G * X).sum(2))
    torch.testing.assert_close(B, G.sum(2))
    W, _ = nt.norm_terms_cpp(G, X, 1e-5)
    torch.testing.assert_close(W, (G * nn.functional.layer_norm(X, (5,))).sum(2))


class _LNNet(nn.Module):
    """Linear - LayerNorm(**ln) - GELU over positions, mean pooling, Linear head."""

    def __init__(self, shape=(6,), **ln):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(5, 6), nn.LayerNorm(shape, **ln), nn.Linear(6, 4)
        self.shape = shape

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h.unflatten(-1, self.shape)).flatten(-len(self.shape))
        return self.head(nn.functional.gelu(h).mean(1))


LN = {"affine": {}, "no_bias": {"bias": False}, "no_affine": {"elementwise_affine": False},
      "two_dims": {"shape": (2, 3), "eps": 0.1}}


def _check(case, quantity, dtype, tol, monkeypatch, backend):
    monkeypatch.setenv("FIMFAST_BACKEND", backend)
    c = case.to(dtype)
    est = DiagFisher(c.model, quantity, likelihood=c.likelihood, seed=0)
    est.step(c.batch)
    rj = row_jacobians(case)
    ref = rj.split(oracle_flat(rj, case.likelihood, quantity))
    assert rel_error(dict(est.result().items()), ref) <= tol
    assert not est._persample.last_plan.generic


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
@pytest.mark.parametrize("ln", list(LN))
def test_layernorm_models_match_oracle(ln, quantity, dtype, backend, monkeypatch):
    if backend == "cpp":
        require("cpp")
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 5), torch.randint(0, 4, (6,))
    case = classifier_case(_LNNet(**LN[ln]), (x, y), 4, name=f"ln_{ln}")
    tol = DET_REL_F32 if dtype == torch.float32 else DET_REL_F64
    _check(case, quantity, dtype, tol, monkeypatch, backend)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("quantity", ["exact", "empirical"])
def test_token_level_layernorm_matches_oracle(quantity, backend, monkeypatch):
    if backend == "cpp":
        require("cpp")
    _check(make_case("token_lm"), quantity, torch.float64, DET_REL_F64, monkeypatch, backend)
