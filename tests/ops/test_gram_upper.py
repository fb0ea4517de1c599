"""``gram_upper_`` (the upper triangle of ``x^T x``, a symmetric rank-k update) and
``mirror_upper_`` (its completion): the cpp kernels and the torch references against float64 on
every layout and dtype, accumulation, empty inputs, argument errors, opcheck, and the fallback
of an extension built before the ops."""

from __future__ import annotations

import pytest
import torch
from op_backends import require

from fimfast.ops import gram as gr


def _layouts(R: int, n: int, dtype: torch.dtype):
    """``(name, x, out)``: x row-major, stored by columns, strided (no BLAS layout), out with a
    row stride past ``n`` (a view of a larger sum) and with a column stride 2."""
    g = torch.Generator().manual_seed(R * 1000 + n)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    def nan(r, c):
        return torch.full((r, c), float("nan"), dtype=dtype)

    yield "row_major", rnd(R, n), nan(n, n)
    yield "by_columns", rnd(n, R).T, nan(n, n)
    yield "strided", rnd(R, 2 * n)[:, ::2], nan(n, n)
    yield "out_view", rnd(R, n), nan(n + 1, n + 3)[:n, :n]
    yield "out_col_stride", rnd(R, n), nan(n, 2 * n)[:, ::2]


def _check(out, x, want, tol):
    torch.testing.assert_close(out.double().triu(), want.triu(), **tol)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("R,n", [(1, 1), (3, 2), (128, 300), (9, 129), (200, 64)])
def test_matches_float64_product(backend, dtype, R, n):
    if backend == "cpp":
        require("cpp")
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                         "atol": 1e-11}
    for name, x, out in _layouts(R, n, dtype):
        want = x.double().T @ x.double()
        gr.gram_upper_(out, x, False, backend=backend)
        _check(out, x, want, tol)
        gr.gram_upper_(out, x, True, backend=backend)  # added to the triangle written above
        _check(out, x, 2 * want, {k: 2 * v for k, v in tol.items()})
        assert out.triu().isfinite().all(), name


def test_cpp_empty_and_checks():
    require("cpp")
    out = torch.full((4, 4), 3.0)
    gr.gram_upper_(out, torch.randn(0, 4), True, backend="cpp")
    assert (out == 3.0).all()
    gr.gram_upper_(out, torch.randn(0, 4), False, backend="cpp")
    assert not out.triu().any()
    gr.gram_upper_(torch.empty(0, 0), torch.randn(5, 0), False, backend="cpp")
    with pytest.raises(ValueError, match="out \\(n, n\\)"):
        gr.gram_upper_(torch.empty(3, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="x of its dtype"):
        gr.gram_upper_(torch.empty(4, 4), torch.randn(5, 4).double())
    op = torch.ops.fimfast.gram_upper_
    with pytest.raises(RuntimeError, match="gram_upper_: out must be \\(n, n\\)"):
        op(torch.empty(3, 3), torch.randn(5, 4), False)
    with pytest.raises(RuntimeError, match="gram_upper_: x must have out's dtype"):
        op(torch.empty(4, 4), torch.randn(5, 4).double(), False)
    with pytest.raises(RuntimeError, match="gram_upper_: out must be float32 or float64"):
        op(torch.empty(4, 4, dtype=torch.float16), torch.randn(5, 4).half(), False)


def test_opcheck():
    require("cpp")
    import fimfast.ops.cpp  # noqa: F401  (the extension and its fake implementations)

    for dt in (torch.float32, torch.float64):
        for acc in (False, True):
            torch.library.opcheck(torch.ops.fimfast.gram_upper_,
                                  (torch.zeros(6, 6, dtype=dt), torch.randn(4, 6, dtype=dt), acc))


def test_extension_without_the_op_runs_the_reference(monkeypatch):
    monkeypatch.setattr(gr, "_OP", "no_such_op")
    x, out = torch.randn(5, 300), torch.zeros(300, 300)
    gr.gram_upper_cpp_(out, x, False)
    torch.testing.assert_close(out.triu(), (x.T @ x).triu())


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 5, 64, 127, 128, 129, 300])
def test_mirror_upper_completes_the_triangle(backend, dtype, n):
    """``mirror_upper_``: the upper triangle scaled, its transpose below the diagonal (poisoned
    with NaN before), on a contiguous matrix, a view with a longer row stride and one with a
    column stride 2."""
    if backend == "cpp":
        require("cpp")
    g = torch.Generator().manual_seed(n)
    up = torch.randn(n, n, generator=g, dtype=torch.float64).to(dtype).double().triu()
    low = torch.ones(n, n, dtype=torch.bool).tril(-1)
    for scale in (1.0, 0.5):
        want = (up + up.triu(1).T) * scale
        for m in (torch.empty(n, n, dtype=dtype), torch.empty(n + 2, n + 5, dtype=dtype)[1:-1, :n],
                  torch.empty(n, 2 * n, dtype=dtype)[:, ::2]):
            m.copy_(up)
            m[low] = float("nan")
            gr.mirror_upper_(m, scale, backend=backend)
            torch.testing.assert_close(m.double(), want, rtol=0, atol=0)


def test_mirror_upper_checks_opcheck_and_fallback(monkeypatch):
    with pytest.raises(ValueError, match="square"):
        gr.mirror_upper_(torch.empty(3, 4))
    with pytest.raises(ValueError, match="float32 or float64"):
        gr.mirror_upper_(torch.empty(3, 3, dtype=torch.float16))
    m = torch.randn(200, 200)
    want = (m.triu() + m.triu(1).T) * 2
    monkeypatch.setattr(gr, "_MIRROR", "no_such_op")
    gr.mirror_upper_cpp_(m, 2.0)
    torch.testing.assert_close(m, want, rtol=0, atol=0)
    monkeypatch.undo()
    require("cpp")
    import fimfast.ops.cpp  # noqa: F401  (the extension and its fake implementations)

    with pytest.raises(RuntimeError, match="mirror_upper_: m must be a square matrix"):
        torch.ops.fimfast.mirror_upper_(torch.empty(3, 4), 1.0)
    gr.mirror_upper_(torch.empty(0, 0), 3.0, backend="cpp")
    for dt in (torch.float32, torch.float64):
        torch.library.opcheck(torch.ops.fimfast.mirror_upper_,
                              (torch.randn(6, 6, dtype=dt), 0.5))
